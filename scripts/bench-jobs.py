#!/usr/bin/env python3
"""Side-by-side benchmark of block jobs: qemu-storage-daemon and
`sluice daemon` run the same QMP job on copies of the same qcow2 files, in
one run, taking turns. Prints a Markdown table of seconds from the job
command to BLOCK_JOB_COMPLETED (best of REPEAT) and the ratio QEMU/sluice
(above 1.0: sluice is faster).

    scripts/bench-jobs.py                 # SIZE=512M REPEAT=3
    SIZE=1G REPEAT=5 scripts/bench-jobs.py

Images: base.qcow2 holds SIZE of random data, mid.qcow2 a quarter of it
again (random), top.qcow2 is an empty overlay. Jobs: stream top from
everything below, intermediate commit of mid into base, mirror (sync
full) of top to a new qcow2, backup (sync full) of top to a new qcow2.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

DIR = os.environ.get("BENCH_DIR", "/var/tmp/sluice-bench/jobs")
SIZE = os.environ.get("SIZE", "512M")
REPEAT = int(os.environ.get("REPEAT", "3"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLUICE = os.path.join(ROOT, "target", "release", "sluice")


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def size_bytes(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            return m["return"]

    def wait_event(self, name):
        while True:
            for e in self.events:
                if e["event"] == name:
                    return e
            self.events.append(json.loads(self.f.readline()))


def make_images(d):
    base, mid, top = (os.path.join(d, f) for f in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    n = size_bytes(SIZE)
    raw = os.path.join(d, "random.raw")
    with open(raw, "wb") as f:
        f.write(os.urandom(n))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    with open(raw, "wb") as f:
        f.write(os.urandom(n // 4))
    run("qemu-io", "-c", f"write -s {raw} 0 {n // 4}", mid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    os.remove(raw)


def job_run(tool, d, job):
    """Starts `tool` on a copy of the images, runs `job`, returns seconds."""
    w = os.path.join(d, "run")
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    for f in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        shutil.copy(os.path.join(d, f), os.path.join(w, f))
    # The copies name their backing files by absolute path: rebase (unsafe).
    run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", os.path.join(w, "base.qcow2"), os.path.join(w, "mid.qcow2"))
    run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", os.path.join(w, "mid.qcow2"), os.path.join(w, "top.qcow2"))
    tgt = os.path.join(w, "tgt.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", tgt, SIZE)
    sock = os.path.join(w, "qmp.sock")
    argv = ([SLUICE, "daemon"] if tool == "sluice" else ["qemu-storage-daemon"]) + [
        "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m",
        "--pidfile", os.path.join(w, "pid"),
    ]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        while not os.path.exists(os.path.join(w, "pid")):
            time.sleep(0.01)
        q = Qmp(sock)
        for n, below in (("base", None), ("mid", "base"), ("top", "mid")):
            q.cmd("blockdev-add", driver="qcow2", backing=below, **{"node-name": n},
                  file={"driver": "file", "filename": os.path.join(w, f"{n}.qcow2")})
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "tgt"},
              file={"driver": "file", "filename": tgt})
        t0 = time.monotonic()
        if job == "stream":
            q.cmd("block-stream", **{"job-id": "j", "device": "top"})
        elif job == "commit":
            q.cmd("block-commit", **{"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base"})
        elif job == "mirror":
            q.cmd("blockdev-mirror", **{"job-id": "j", "device": "top", "target": "tgt", "sync": "full"})
            q.wait_event("BLOCK_JOB_READY")
            q.cmd("job-complete", id="j")
        elif job == "backup":
            q.cmd("blockdev-backup", **{"job-id": "j", "device": "top", "target": "tgt", "sync": "full"})
        e = q.wait_event("BLOCK_JOB_COMPLETED")
        took = time.monotonic() - t0
        if "error" in e["data"]:
            raise RuntimeError(f"{tool} {job}: {e['data']['error']}")
        q.cmd("quit")
        p.wait(timeout=60)
        run("qemu-img", "check", os.path.join(w, "top.qcow2"))
        return took
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def main():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "sluice"], cwd=ROOT, check=True)
    os.makedirs(DIR, exist_ok=True)
    make_images(DIR)
    rows = []
    for job in ("stream", "commit", "mirror", "backup"):
        best = {"qemu": float("inf"), "sluice": float("inf")}
        for _ in range(REPEAT):
            for tool in ("qemu", "sluice"):
                best[tool] = min(best[tool], job_run(tool, DIR, job))
        rows.append((job, best["qemu"], best["sluice"]))
        print(f"{job}: qemu {best['qemu']:.3f}s sluice {best['sluice']:.3f}s", file=sys.stderr)
    print(f"| job ({SIZE} base, best of {REPEAT}) | qemu-storage-daemon s | sluice daemon s | QEMU/sluice |")
    print("| --- | ---: | ---: | ---: |")
    for job, q, s in rows:
        print(f"| {job} | {q:.3f} | {s:.3f} | **{q / s:.2f}** |")


if __name__ == "__main__":
    main()

//! `-p` progress for convert, commit, rebase and compare. Without a
//! terminal on stderr it prints qemu-img's own line (`    (12.34/100%)`
//! and a carriage return, to stdout, at every whole percent), so scripts
//! that read qemu-img's output read ours; on a terminal it draws a bar
//! with the rate and the time left on stderr.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    state: Option<Mutex<State>>,
}

struct State {
    tty: bool,
    start: Instant,
    last_pct: f64,
    last_draw: Option<Instant>,
    done: u64,
    total: u64,
}

impl Progress {
    /// A progress report, or a no-op when `enabled` is false.
    pub fn new(enabled: bool) -> Progress {
        let state = enabled.then(|| {
            let s = State {
                tty: std::io::stderr().is_terminal(),
                start: Instant::now(),
                last_pct: 0.0,
                last_draw: None,
                done: 0,
                total: 0,
            };
            if !s.tty {
                simple(0.0);
            }
            Mutex::new(s)
        });
        Progress { state }
    }

    /// `done` of `total` bytes are through.
    pub fn set(&self, done: u64, total: u64) {
        let Some(m) = &self.state else { return };
        let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
        s.done = done.min(total);
        s.total = total;
        let pct = if total == 0 {
            100.0
        } else {
            s.done as f64 * 100.0 / total as f64
        };
        if s.tty {
            let now = Instant::now();
            if s.last_draw
                .is_none_or(|t| now - t >= Duration::from_millis(100))
                || pct >= 100.0
            {
                s.last_draw = Some(now);
                s.draw(pct);
            }
        } else if pct - s.last_pct >= 1.0 || (pct >= 100.0 && s.last_pct < 100.0) {
            s.last_pct = pct;
            simple(pct);
        }
    }

    /// Ends the report: 100% and a newline.
    pub fn finish(&self) {
        let Some(m) = &self.state else { return };
        let s = m.lock().unwrap_or_else(|e| e.into_inner());
        if s.tty {
            s.draw(100.0);
            eprintln!();
        } else {
            if s.last_pct < 100.0 {
                simple(100.0);
            }
            println!();
        }
    }
}

fn simple(pct: f64) {
    let mut o = std::io::stdout().lock();
    let _ = write!(o, "    ({pct:3.2}/100%)\r");
    let _ = o.flush();
}

impl State {
    fn draw(&self, pct: f64) {
        const WIDTH: usize = 30;
        let filled = ((pct / 100.0) * WIDTH as f64) as usize;
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let eta = if rate > 0.0 && self.total > self.done {
            ((self.total - self.done) as f64 / rate) as u64
        } else {
            0
        };
        let bar: String = "#".repeat(filled.min(WIDTH)) + &"-".repeat(WIDTH - filled.min(WIDTH));
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r[{bar}] {pct:6.2}% {:>10}/s ETA {:02}:{:02}:{:02} ",
            super::common::size_to_str(rate as u64),
            eta / 3600,
            (eta / 60) % 60,
            eta % 60
        );
        let _ = e.flush();
    }
}

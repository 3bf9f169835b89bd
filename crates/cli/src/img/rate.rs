//! `-r RATE` of `convert` and `commit`: at most RATE bytes per second.
//!
//! qemu-img limits convert with a throttle on the target (a leaky bucket:
//! a write may start while the bucket holds at most a tenth of a second's
//! worth, then adds its bytes; the bucket drains at RATE; zero writes
//! count) and commit with the block job's speed (each chunk waits until
//! the ones before it are paid for; ranges written as zeroes are free).
//! Both bound the average over the run, and so does [`Limiter`]: the
//! bucket, kept as the instant it will be empty. Nothing polls: a piece
//! that must wait sleeps once, until the bucket is low enough.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How a copy is limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second.
    pub bytes_per_sec: u64,
    /// A piece may start while this much time's worth is still queued.
    pub burst: Duration,
    /// Ranges written as zeroes count too.
    pub count_zeroes: bool,
}

impl RateLimit {
    /// convert's limit, the target's throttle; none for 0.
    pub fn throttle(bytes_per_sec: u64) -> Option<RateLimit> {
        (bytes_per_sec > 0).then_some(RateLimit {
            bytes_per_sec,
            burst: Duration::from_millis(100),
            count_zeroes: true,
        })
    }

    /// commit's limit, the job's speed; none for 0.
    pub fn job(bytes_per_sec: u64) -> Option<RateLimit> {
        (bytes_per_sec > 0).then_some(RateLimit {
            bytes_per_sec,
            burst: Duration::ZERO,
            count_zeroes: false,
        })
    }
}

/// A leaky bucket draining `rate` bytes per second.
pub struct Limiter {
    rate: u64,
    burst: Duration,
    /// When the bucket will be empty (`None`: it is).
    empty_at: Mutex<Option<Instant>>,
}

/// Far enough ahead to stand for "never" without overflowing `Instant`.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86400);

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        Limiter {
            rate: limit.bytes_per_sec.max(1),
            burst: limit.burst,
            empty_at: Mutex::new(None),
        }
    }

    /// The time `bytes` take at the rate, rounded up.
    fn cost(&self, bytes: u64) -> Duration {
        let ns = (u128::from(bytes) * 1_000_000_000).div_ceil(u128::from(self.rate));
        u64::try_from(ns).map_or(FOREVER, Duration::from_nanos)
    }

    /// Waits until a piece of `bytes` may start, and counts it.
    pub async fn admit(&self, bytes: u64) {
        loop {
            let wake = {
                let mut empty_at = self.empty_at.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let empty = empty_at.map_or(now, |t| t.max(now));
                let queued = empty - now;
                if queued <= self.burst {
                    let cost = self.cost(bytes);
                    *empty_at = Some(empty.checked_add(cost).unwrap_or_else(|| now + FOREVER));
                    return;
                }
                now + (queued - self.burst)
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Parses `-r RATE` as qemu-img does (a size with its suffixes: `10M` is
/// 10 MiB/s; 0 is no limit), with its messages.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    use sluice_drivers::size::{parse_size, NumError};
    let range = || "Invalid rate limit specified. Must be between 0 and 9223372036854775807.";
    let invalid = || format!("Invalid rate limit specified: '{s}'.");
    // qemu_strtosz reads the leading integer first: a negative or
    // overflowing one is out of range when nothing follows it, else the
    // whole text is invalid.
    let t = s.trim_start();
    let (negative, rest) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits > 0 && (negative || rest[..digits].parse::<u64>().is_err()) {
        return Err(if digits == rest.len() {
            range().to_string()
        } else {
            invalid()
        });
    }
    match parse_size(s) {
        Ok(v) => Ok(v),
        Err(NumError::TooLarge) => Err(range().to_string()),
        Err(NumError::Invalid) => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    const MIB: u64 = 1 << 20;

    #[test]
    fn rates_parse_with_qemu_imgs_messages() {
        let range = "Invalid rate limit specified. Must be between 0 and 9223372036854775807.";
        for (arg, want) in [
            ("0", Ok(0)),
            ("10M", Ok(10 * MIB)),
            ("1.5k", Ok(1536)),
            ("1b", Ok(1)),
            ("512", Ok(512)),
            ("0x10", Ok(16)),
            ("+5", Ok(5)),
            ("8191P", Ok(8191 << 50)),
            ("-1", Err(range.to_string())),
            ("-0", Err(range.to_string())),
            (" -1", Err(range.to_string())),
            ("8E", Err(range.to_string())),
            ("99999999999999999999", Err(range.to_string())),
            ("18446744073709551615", Err(range.to_string())),
            ("0x8000000000000000", Err(range.to_string())),
        ] {
            assert_eq!(parse_rate(arg), want, "{arg:?}");
        }
        for arg in [
            "abc",
            "",
            "1Z",
            "10x",
            "1e3",
            "-1k",
            "-abc",
            "-",
            "-1.5",
            "-.5k",
            "-0x10",
            " -1 ",
            "99999999999999999999k",
        ] {
            assert_eq!(
                parse_rate(arg),
                Err(format!("Invalid rate limit specified: '{arg}'.")),
                "{arg:?}"
            );
        }
    }

    #[test]
    fn zero_is_no_limit() {
        assert_eq!(RateLimit::throttle(0), None);
        assert_eq!(RateLimit::job(0), None);
        assert!(RateLimit::throttle(1).is_some_and(|l| l.count_zeroes));
        assert!(RateLimit::job(1).is_some_and(|l| !l.count_zeroes));
    }

    /// Admits `pieces` of `size` bytes, then one more (empty) piece;
    /// returns the virtual time each admission took place at.
    async fn admissions(limit: RateLimit, size: u64, pieces: usize) -> Vec<Duration> {
        let l = Limiter::new(limit);
        let t0 = Instant::now();
        let mut at = Vec::new();
        for i in 0..=pieces {
            l.admit(if i == pieces { 0 } else { size }).await;
            at.push(t0.elapsed());
        }
        at
    }

    #[tokio::test(start_paused = true)]
    async fn job_speed_admits_n_bytes_in_n_over_r() {
        // 2 MiB in 64 KiB pieces at 1000 KiB/s (64 ms a piece): whatever
        // follows starts after 2.048 s (virtual), and piece i after i * 64 ms.
        let at = admissions(RateLimit::job(1000 << 10).unwrap(), 64 << 10, 32).await;
        assert_eq!(at[0], Duration::ZERO, "the first piece waits for nothing");
        for (i, t) in at.iter().enumerate() {
            let due = Duration::from_millis(64 * i as u64);
            assert!(*t >= due, "piece {i} at {t:?}, before {due:?}");
            assert!(
                *t <= due + Duration::from_millis(1),
                "piece {i} late: {t:?}"
            );
        }
        assert_eq!(at[32], Duration::from_millis(2048));
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_allows_a_tenth_of_a_second_ahead() {
        // 4 MiB in 1 MiB pieces at 4 MiB/s: 250 ms per piece, each may
        // start 100 ms before the bucket is empty.
        let at = admissions(RateLimit::throttle(4 * MIB).unwrap(), MIB, 4).await;
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(at, vec![ms(0), ms(150), ms(400), ms(650), ms(900)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_average_over_a_run_is_bounded() {
        // Pieces of changing sizes, zero-length ones among them: at each
        // admission, what came before is at most RATE * elapsed plus the
        // burst's worth; and a piece that waited did not wait longer than
        // that bound needs.
        let rate = 3 * MIB;
        let limit = RateLimit::throttle(rate).unwrap();
        let l = Limiter::new(limit);
        let t0 = Instant::now();
        let mut before = 0u64;
        let mut waited_any = false;
        for i in 0..200u64 {
            let size = (i * 7919 % 13) * 37 * 1024;
            let asked = Instant::now();
            l.admit(size).await;
            let t = t0.elapsed().as_secs_f64();
            let allowed = rate as f64 * (t + limit.burst.as_secs_f64());
            assert!(
                before as f64 <= allowed + 1.0,
                "piece {i}: {before} bytes before it at {t} s"
            );
            if asked.elapsed() > Duration::ZERO {
                // Admitted within the timer's millisecond of the moment
                // the bound allowed it.
                waited_any = true;
                assert!(
                    before as f64 >= allowed - rate as f64 * 1.001e-3,
                    "piece {i} waited too long: {before} bytes at {t} s"
                );
            }
            before += size;
        }
        assert!(waited_any);
        // The whole run took at least (N - burst) / RATE.
        let min = (before as f64 / rate as f64) - limit.burst.as_secs_f64();
        l.admit(0).await;
        assert!(t0.elapsed().as_secs_f64() >= min - 1e-6);
    }

    /// Counts how often the inner future is polled.
    struct Polls<F> {
        inner: Pin<Box<F>>,
        count: usize,
    }

    impl<F: Future> Future for Polls<F> {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.count += 1;
            match self.inner.as_mut().poll(cx) {
                Poll::Ready(_) => Poll::Ready(self.count),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_piece_sleeps_instead_of_spinning() {
        let l = Limiter::new(RateLimit::job(MIB).unwrap());
        l.admit(10 * MIB).await;
        let t0 = Instant::now();
        let polls = Polls {
            inner: Box::pin(l.admit(1)),
            count: 0,
        }
        .await;
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        assert!(polls <= 2, "polled {polls} times for one wait");
    }

    #[tokio::test(start_paused = true)]
    async fn huge_pieces_do_not_overflow() {
        let l = Limiter::new(RateLimit::job(1).unwrap());
        l.admit(u64::MAX).await;
        let next = tokio::time::timeout(Duration::from_secs(86400), l.admit(1)).await;
        assert!(next.is_err(), "the bucket holds years of bytes");
    }
}

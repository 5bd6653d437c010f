//! Jittered exponential backoff between reconnection attempts: `min` doubling to `max`, each
//! delay scaled by a random factor in [0.5, 1.5) so a fleet that lost its broker at the same
//! moment does not come back in lock step.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    /// `seed` decorrelates devices (the link uses a hash of the device id and the start time).
    pub fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
            rng: seed | 1,
        }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.5 + self.random())
    }

    /// A connection succeeded: start again from `min`.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// xorshift64*: uniform in [0, 1).
    fn random(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        let mut b = Backoff::new(min, max, 42);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = (min * 2u32.pow(i as u32)).min(max);
            assert!(
                *d >= base / 2 && *d < base * 3 / 2,
                "{i}: {d:?} vs {base:?}"
            );
        }
        assert!(delays[11] >= max / 2);
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 6, "jittered");
        b.reset();
        assert!(b.next_delay() < min * 3 / 2);
    }
}

//! Jittered exponential backoff between reconnection attempts: `min` doubling to `max`, each
//! delay scaled by a random factor in [0.5, 1.5) so a fleet that lost its broker at the same
//! moment does not come back in lock step.
//!
//! The seed is scrambled (splitmix64) before it seeds the generator: devices' seeds can differ
//! in a bit or two only (consecutive device ids, the same start time), and must still draw
//! unrelated delays.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    /// `seed` decorrelates devices (the link hashes the device id, the start time and a random
    /// key of the process).
    pub fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
            // xorshift's state must not be zero.
            rng: splitmix64(seed).max(1),
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

/// The splitmix64 finaliser: every input bit flips about half the output bits.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

    /// Seeds one apart (consecutive device ids started in the same microsecond) used to fall on
    /// the same generator state (`seed | 1`), so pairs of devices reconnected in lock step.
    #[test]
    fn nearby_seeds_draw_unrelated_delays() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        let first: Vec<Duration> = (0..256u64)
            .map(|i| Backoff::new(min, max, 1_760_000_000_000_000 + i).next_delay())
            .collect();
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(distinct.len(), first.len(), "two seeds drew the same delay");
        // Spread over the whole jitter range [250 ms, 750 ms), in every fifth of it.
        let mut fifths = [0usize; 5];
        for d in &first {
            assert!(*d >= min / 2 && *d < min * 3 / 2, "{d:?}");
            fifths[((d.as_secs_f64() - 0.25) / 0.1) as usize] += 1;
        }
        assert!(fifths.iter().all(|n| *n >= 256 / 5 / 2), "{fifths:?}");
        // Neighbours are not correlated: half of them draw in the opposite order.
        let rising = first.windows(2).filter(|w| w[1] > w[0]).count();
        assert!((90..=165).contains(&rising), "{rising} of 255 rise");
    }
}

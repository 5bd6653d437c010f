//! Deterministic cohorts: which devices are canaries at a given stage of a rollout.
//!
//! Every device gets a rank, the first 8 bytes of sha256(rollout id, device id); a stage of
//! `percent` takes the `ceil(n * percent / 100)` lowest-ranked devices of the `n` selected ones.
//! The ranks do not depend on the stage, so each stage's canaries contain the previous stage's
//! (for an unchanged device set), and a different rollout draws a different sample. The server
//! never un-stages a device: a device staged earlier stays a canary even if devices joining the
//! fleet later push it out of the lowest ranks.

use sha2::{Digest, Sha256};

/// The rank of a device in a rollout (lower ranks are staged first).
pub fn rank(rollout_id: &str, device_id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(rollout_id.as_bytes());
    h.update([0u8]);
    h.update(device_id.as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
}

/// How many of `selected` devices a stage of `percent` takes: at least one if any are selected.
pub fn canary_count(selected: usize, percent: u32) -> usize {
    if selected == 0 {
        return 0;
    }
    let n = (selected as u64 * percent.min(100) as u64).div_ceil(100) as usize;
    n.clamp(1, selected)
}

/// The canaries of a stage: the `canary_count` lowest-ranked of `devices`, in rank order.
pub fn canaries<'d, S: AsRef<str>>(
    rollout_id: &str,
    devices: &'d [S],
    percent: u32,
) -> Vec<&'d str> {
    let mut ranked: Vec<(u64, &str)> = devices
        .iter()
        .map(|d| (rank(rollout_id, d.as_ref()), d.as_ref()))
        .collect();
    ranked.sort_unstable();
    ranked
        .into_iter()
        .take(canary_count(devices.len(), percent))
        .map(|(_, d)| d)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i:04}")).collect()
    }

    #[test]
    fn stages_grow_as_supersets_and_hit_their_size() {
        let devices = fleet(200);
        let mut previous: Vec<&str> = Vec::new();
        for (percent, expected) in [(1, 2), (10, 20), (50, 100), (100, 200)] {
            let now = canaries("r-1", &devices, percent);
            assert_eq!(now.len(), expected, "{percent}%");
            assert!(previous.iter().all(|d| now.contains(d)), "{percent}%");
            previous = now;
        }
    }

    #[test]
    fn cohorts_differ_between_rollouts_and_are_stable() {
        let devices = fleet(100);
        let a = canaries("r-1", &devices, 10);
        assert_eq!(a, canaries("r-1", &devices, 10));
        assert_ne!(a, canaries("r-2", &devices, 10));
    }

    #[test]
    fn small_fleets_still_get_a_canary() {
        assert_eq!(canary_count(0, 10), 0);
        assert_eq!(canary_count(3, 10), 1);
        assert_eq!(canary_count(3, 100), 3);
        assert_eq!(canary_count(3, 250), 3);
    }
}

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
    let mut ranking = Ranking::default();
    ranking.update(rollout_id, devices);
    ranking
        .canaries(percent)
        .iter()
        .map(|&i| devices[i as usize].as_ref())
        .collect()
}

/// The rank order of a rollout's selected devices, kept from one step of the rollout to the
/// next: ranking is a sha256 per device and a sort, which a rollout ticking once a second over
/// ten thousand devices would otherwise redo every second for the same devices.
#[derive(Debug, Default)]
pub struct Ranking {
    rollout_id: String,
    /// The devices ranked, as given to [`Ranking::update`].
    ids: Vec<String>,
    /// Indices into `ids`, lowest rank first (ties, which need a sha256 collision, by id).
    order: Vec<u32>,
}

impl Ranking {
    /// Ranks `devices` for `rollout_id`, unless they are the devices (in the same order) that
    /// it ranked last for that rollout.
    pub fn update<S: AsRef<str>>(&mut self, rollout_id: &str, devices: &[S]) {
        let same = self.rollout_id == rollout_id
            && self.ids.len() == devices.len()
            && self.ids.iter().zip(devices).all(|(a, b)| a == b.as_ref());
        if same {
            return;
        }
        self.rollout_id = rollout_id.to_string();
        self.ids = devices.iter().map(|d| d.as_ref().to_string()).collect();
        let ranks: Vec<u64> = self.ids.iter().map(|d| rank(rollout_id, d)).collect();
        self.order = (0..self.ids.len() as u32).collect();
        self.order.sort_unstable_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            (ranks[a], &self.ids[a]).cmp(&(ranks[b], &self.ids[b]))
        });
    }

    /// The canaries of a stage of `percent`: indices into the devices last given to
    /// [`Ranking::update`], lowest rank first.
    pub fn canaries(&self, percent: u32) -> &[u32] {
        &self.order[..canary_count(self.ids.len(), percent)]
    }
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
    fn a_kept_ranking_follows_the_devices_and_the_rollout() {
        let devices = fleet(50);
        let mut ranking = Ranking::default();
        ranking.update("r-1", &devices);
        let names = |r: &Ranking, d: &[String], p| -> Vec<String> {
            r.canaries(p)
                .iter()
                .map(|&i| d[i as usize].clone())
                .collect()
        };
        assert_eq!(names(&ranking, &devices, 20), canaries("r-1", &devices, 20));
        // Another rollout ranks afresh.
        ranking.update("r-2", &devices);
        assert_eq!(names(&ranking, &devices, 20), canaries("r-2", &devices, 20));
        // So does a changed fleet: a device gone, another joined (indices are into the new list).
        let mut changed = devices[1..].to_vec();
        changed.push("dev-new".into());
        ranking.update("r-2", &changed);
        assert_eq!(names(&ranking, &changed, 20), canaries("r-2", &changed, 20));
        assert_eq!(ranking.canaries(100).len(), 50);
    }

    #[test]
    fn small_fleets_still_get_a_canary() {
        assert_eq!(canary_count(0, 10), 0);
        assert_eq!(canary_count(3, 10), 1);
        assert_eq!(canary_count(3, 100), 3);
        assert_eq!(canary_count(3, 250), 3);
    }
}

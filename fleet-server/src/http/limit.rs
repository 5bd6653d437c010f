//! Rate limit on failed authentication, per client address.
//!
//! A client address (an IPv4 address, or the /64 of an IPv6 address, so rotating through one's
//! own prefix does not help) that presented `max_failures` wrong or malformed tokens within
//! `window` is answered 429 with `Retry-After` — for every authenticated route, before its token
//! is looked at — until the window that began with its first failure ends. A missing token is
//! not a guess and is not counted. Behind a reverse proxy every client shares the proxy's
//! address: the proxy should then limit on its own (the server does not trust
//! `X-Forwarded-For`).
//!
//! Memory is bounded: at most [`MAX_TRACKED`] addresses are remembered; when full, expired
//! entries are dropped, then the oldest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most client addresses remembered at once.
pub const MAX_TRACKED: usize = 65_536;

/// How many failures in what window block a client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureLimit {
    pub max_failures: u32,
    pub window: Duration,
}

impl Default for AuthFailureLimit {
    /// 20 failures a minute: far above a person mistyping, far below a guessing loop.
    fn default() -> AuthFailureLimit {
        AuthFailureLimit {
            max_failures: 20,
            window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    since: Instant,
    failures: u32,
}

/// Failure counts per client address.
#[derive(Debug)]
pub struct FailureLimiter {
    limit: AuthFailureLimit,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// The key a client address is counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

impl FailureLimiter {
    pub fn new(limit: AuthFailureLimit) -> FailureLimiter {
        FailureLimiter {
            limit,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How long `ip` must wait, if it is blocked at `now`.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(&key(ip))?;
        let end = e.since + self.limit.window;
        (e.failures >= self.limit.max_failures && now < end).then(|| end - now)
    }

    /// Records a failed authentication from `ip` at `now`.
    pub fn fail(&self, ip: IpAddr, now: Instant) {
        let window = self.limit.window;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(ip);
        if !entries.contains_key(&k) && entries.len() >= MAX_TRACKED {
            entries.retain(|_, e| now < e.since + window);
            if entries.len() >= MAX_TRACKED {
                if let Some(oldest) = entries.iter().min_by_key(|(_, e)| e.since).map(|(k, _)| *k) {
                    entries.remove(&oldest);
                }
            }
        }
        let e = entries.entry(k).or_insert(Entry {
            since: now,
            failures: 0,
        });
        if now >= e.since + window {
            *e = Entry {
                since: now,
                failures: 0,
            };
        }
        e.failures = e.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_n_failures_until_its_window_ends() {
        let l = FailureLimiter::new(AuthFailureLimit {
            max_failures: 3,
            window: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for i in 0..3 {
            assert_eq!(l.blocked(a, t0), None, "after {i} failures");
            l.fail(a, t0 + Duration::from_secs(i));
        }
        let wait = l.blocked(a, t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(wait, Duration::from_secs(7));
        assert_eq!(l.blocked(b, t0), None, "other addresses are not affected");
        assert_eq!(l.blocked(a, t0 + Duration::from_secs(10)), None);
        // A new window starts from zero.
        l.fail(a, t0 + Duration::from_secs(11));
        assert_eq!(l.blocked(a, t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_v4_as_v4() {
        let l = FailureLimiter::new(AuthFailureLimit {
            max_failures: 2,
            window: Duration::from_secs(10),
        });
        let t = Instant::now();
        l.fail("2001:db8:1:2::1".parse().unwrap(), t);
        l.fail("2001:db8:1:2:ffff::9".parse().unwrap(), t);
        assert!(l.blocked("2001:db8:1:2::77".parse().unwrap(), t).is_some());
        assert!(l.blocked("2001:db8:1:3::1".parse().unwrap(), t).is_none());
        l.fail("::ffff:10.1.1.1".parse().unwrap(), t);
        l.fail("10.1.1.1".parse().unwrap(), t);
        assert!(l.blocked("10.1.1.1".parse().unwrap(), t).is_some());
    }
}

//! Which of our QoS 1 publishes the broker has acknowledged.
//!
//! rumqttc 0.25 has no per-publish acknowledgement future: `AsyncClient::try_publish` only queues
//! a request, and the event loop later reports `Outgoing::Publish(pkid)` when it assigns a packet
//! id and writes the packet, then `Incoming::PubAck(pkid)` when the broker acknowledges it.
//! Because one task both queues publishes and reads the event loop, the order of fresh
//! `Outgoing::Publish` events is the order the publishes were queued, so a FIFO of "what was
//! queued" maps packet ids to what they carry:
//!
//! - [`AckTracker::queued`] when a publish is handed to the client;
//! - [`AckTracker::sent`] on `Outgoing::Publish(pkid)`: a pkid already in flight is a
//!   retransmission (rumqttc replays unacknowledged publishes with their old pkid after a
//!   reconnect, and re-sends a publish that collided on its pkid), so the FIFO is not popped;
//!   otherwise the oldest queued item now has that pkid;
//! - [`AckTracker::acked`] on `Incoming::PubAck(pkid)` returns what it was;
//! - [`AckTracker::reset`] when the session's in-flight publishes are given up (the link drops
//!   rumqttc's pending replays on a connection loss and re-sends from its durable state), returning
//!   everything unacknowledged so the owners can send it again.

use std::collections::{HashMap, VecDeque};

/// What an `Outgoing::Publish` turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// A queued publish got this pkid.
    Fresh,
    /// A publish already in flight under this pkid went out again.
    Replay,
    /// Nothing was queued: a publish the tracker was not told about.
    Untracked,
}

#[derive(Debug)]
pub struct AckTracker<T> {
    queued: VecDeque<T>,
    in_flight: HashMap<u16, T>,
}

impl<T> Default for AckTracker<T> {
    fn default() -> Self {
        AckTracker {
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
        }
    }
}

impl<T> AckTracker<T> {
    /// A publish carrying `item` was handed to the client.
    pub fn queued(&mut self, item: T) {
        self.queued.push_back(item);
    }

    /// The event loop reported `Outgoing::Publish(pkid)`.
    pub fn sent(&mut self, pkid: u16) -> Sent {
        if self.in_flight.contains_key(&pkid) {
            return Sent::Replay;
        }
        match self.queued.pop_front() {
            Some(item) => {
                self.in_flight.insert(pkid, item);
                Sent::Fresh
            }
            None => Sent::Untracked,
        }
    }

    /// The broker acknowledged `pkid`: what that publish carried (None if unknown).
    pub fn acked(&mut self, pkid: u16) -> Option<T> {
        self.in_flight.remove(&pkid)
    }

    /// Forgets everything unacknowledged and returns it (in flight first, then queued).
    pub fn reset(&mut self) -> Vec<T> {
        let mut lost: Vec<(u16, T)> = self.in_flight.drain().collect();
        lost.sort_by_key(|(pkid, _)| *pkid);
        let mut out: Vec<T> = lost.into_iter().map(|(_, t)| t).collect();
        out.extend(self.queued.drain(..));
        out
    }

    /// Publishes queued or in flight.
    pub fn len(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_publishes_take_pkids_in_queue_order_and_acks_return_them() {
        let mut t = AckTracker::default();
        t.queued("a");
        t.queued("b");
        t.queued("c");
        assert_eq!(t.sent(1), Sent::Fresh);
        assert_eq!(t.sent(2), Sent::Fresh);
        // Out-of-order acks are fine.
        assert_eq!(t.acked(2), Some("b"));
        assert_eq!(t.sent(3), Sent::Fresh);
        assert_eq!(t.acked(1), Some("a"));
        assert_eq!(t.acked(3), Some("c"));
        assert_eq!(t.acked(3), None, "an ack counts once");
        assert!(t.is_empty());
    }

    #[test]
    fn a_replay_of_a_known_pkid_does_not_consume_the_queue() {
        let mut t = AckTracker::default();
        t.queued("a");
        t.queued("b");
        assert_eq!(t.sent(7), Sent::Fresh);
        // Reconnect: pkid 7 is re-sent, then the queued publish goes out fresh.
        assert_eq!(t.sent(7), Sent::Replay);
        assert_eq!(t.sent(8), Sent::Fresh);
        assert_eq!(t.acked(7), Some("a"));
        assert_eq!(t.acked(8), Some("b"));
    }

    #[test]
    fn a_collision_resolves_to_the_right_item() {
        // rumqttc: publish "b" wants pkid 1 while "a" still holds it (AwaitAck, nothing
        // written); when 1 is acked, "b" is written as Outgoing::Publish(1).
        let mut t = AckTracker::default();
        t.queued("a");
        assert_eq!(t.sent(1), Sent::Fresh);
        t.queued("b");
        assert_eq!(t.acked(1), Some("a"));
        assert_eq!(t.sent(1), Sent::Fresh);
        assert_eq!(t.acked(1), Some("b"));
    }

    #[test]
    fn reset_returns_everything_unacknowledged() {
        let mut t = AckTracker::default();
        for x in ["a", "b", "c"] {
            t.queued(x);
        }
        t.sent(5);
        t.sent(4);
        assert_eq!(t.reset(), vec!["b", "a", "c"]);
        assert!(t.is_empty());
        assert_eq!(t.sent(1), Sent::Untracked);
        assert_eq!(t.acked(5), None, "a stale ack after a reset is ignored");
    }
}

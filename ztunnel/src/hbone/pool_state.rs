//! The pool's bookkeeping for one key, without I/O: which pooled connection a new tunnel
//! takes a stream slot on, which dial in flight it waits for, or whether it dials itself.
//!
//! A dial in flight counts its waiters against the stream cap of the connection it will
//! become. Up to `max_streams` connects share one dial, so they succeed or fail together
//! after one connect timeout at most, instead of dialing one after another; the next connect
//! starts another dial. A dial that succeeds enters the pool with one slot taken for each
//! of its waiters; one that fails leaves nothing behind, and the next connect dials anew.
//!
//! A slot, whether on a connection or among a dial's waiters, is given back with
//! [`KeyState::release`] under the same id: a dial's id becomes its connection's id, so a
//! waiter that gives up before or after the dial ends releases the right thing.

use std::time::SystemTime;

use tokio::time::Instant;

/// A pooled connection; `C` is its handle (an HTTP/2 `SendRequest`).
#[derive(Debug)]
pub(super) struct Conn<C> {
    pub(super) id: u64,
    pub(super) handle: C,
    /// Stream slots taken (tunnels open or being opened).
    pub(super) active: usize,
    pub(super) idle_since: Instant,
    /// The first `not_after` of the two certificates of the handshake.
    pub(super) expires: SystemTime,
}

/// A dial in flight; `W` is what its waiters watch for the outcome.
#[derive(Debug)]
struct Dial<W> {
    id: u64,
    /// Connects that will each take a slot on the connection: the dialing one included.
    waiters: usize,
    outcome: W,
}

/// Connections and dials in flight for one pool key.
#[derive(Debug)]
pub(super) struct KeyState<C, W> {
    pub(super) conns: Vec<Conn<C>>,
    dials: Vec<Dial<W>>,
}

impl<C, W> Default for KeyState<C, W> {
    fn default() -> Self {
        KeyState {
            conns: Vec::new(),
            dials: Vec::new(),
        }
    }
}

/// What a connect does next; in the first two cases it holds a slot under `id` until it
/// releases it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step<C, W> {
    /// Open the tunnel on pooled connection `id`.
    Use { id: u64, handle: C },
    /// Wait for dial `id`, then open the tunnel on its connection.
    Join { id: u64, outcome: W },
    /// No room anywhere: dial, after [`KeyState::start_dial`].
    Dial,
}

impl<C: Clone, W: Clone> KeyState<C, W> {
    /// Takes a slot: on the first connection with room, else among the waiters of the first
    /// dial with room; else nothing is taken ([`Step::Dial`]).
    pub(super) fn take(&mut self, max: usize) -> Step<C, W> {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.active < max) {
            conn.active += 1;
            return Step::Use {
                id: conn.id,
                handle: conn.handle.clone(),
            };
        }
        if let Some(dial) = self.dials.iter_mut().find(|d| d.waiters < max) {
            dial.waiters += 1;
            return Step::Join {
                id: dial.id,
                outcome: dial.outcome.clone(),
            };
        }
        Step::Dial
    }
}

impl<C, W> KeyState<C, W> {
    /// Registers dial `id`, whose waiters watch `outcome`, with the dialer as its first
    /// waiter (a slot under `id`).
    pub(super) fn start_dial(&mut self, id: u64, outcome: W) {
        self.dials.push(Dial {
            id,
            waiters: 1,
            outcome,
        });
    }

    /// Dial `id` gave a connection: it enters the pool with a slot taken for each waiter
    /// still there. Returns how many; `None` if the dial was no longer known (ended).
    pub(super) fn dial_succeeded(
        &mut self,
        id: u64,
        handle: C,
        expires: SystemTime,
        now: Instant,
    ) -> Option<usize> {
        let dial = self.end_dial(id)?;
        self.conns.push(Conn {
            id,
            handle,
            active: dial,
            idle_since: now,
            expires,
        });
        Some(dial)
    }

    /// Dial `id` failed or was abandoned: it is forgotten. Returns how many waiters it had
    /// (`None` if it was no longer known).
    pub(super) fn end_dial(&mut self, id: u64) -> Option<usize> {
        let at = self.dials.iter().position(|d| d.id == id)?;
        Some(self.dials.swap_remove(at).waiters)
    }

    /// Gives back a slot taken under `id`: a waiter's place if the dial is still in flight,
    /// else a stream slot of the connection.
    pub(super) fn release(&mut self, id: u64, now: Instant) {
        if let Some(dial) = self.dials.iter_mut().find(|d| d.id == id) {
            dial.waiters = dial.waiters.saturating_sub(1);
        } else if let Some(conn) = self.conn_mut(id) {
            conn.active = conn.active.saturating_sub(1);
            if conn.active == 0 {
                conn.idle_since = now;
            }
        }
    }

    pub(super) fn conn_mut(&mut self, id: u64) -> Option<&mut Conn<C>> {
        self.conns.iter_mut().find(|c| c.id == id)
    }

    pub(super) fn remove_conn(&mut self, id: u64) {
        self.conns.retain(|c| c.id != id);
    }

    /// Nothing pooled and nothing in flight: the key can be forgotten.
    pub(super) fn is_unused(&self) -> bool {
        self.conns.is_empty() && self.dials.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MAX: usize = 100;

    type State = KeyState<&'static str, u64>;

    /// Takes a slot, starting dial `next` (outcome `next * 10`) when there is no room, as
    /// the pool does; returns what `take` said.
    fn take(s: &mut State, next: u64) -> Step<&'static str, u64> {
        let step = s.take(MAX);
        if step == Step::Dial {
            s.start_dial(next, next * 10);
        }
        step
    }

    fn far_future() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    #[test]
    fn up_to_the_cap_connects_share_one_dial_and_the_next_starts_another() {
        let mut s = State::default();
        assert_eq!(take(&mut s, 1), Step::Dial);
        for n in 2..=MAX as u64 {
            assert_eq!(take(&mut s, n), Step::Join { id: 1, outcome: 10 });
        }
        assert_eq!(take(&mut s, 500), Step::Dial);
        assert_eq!(
            take(&mut s, 501),
            Step::Join {
                id: 500,
                outcome: 5000
            }
        );
    }

    #[test]
    fn a_successful_dial_enters_the_pool_with_its_waiters_slots_taken() {
        let mut s = State::default();
        let now = Instant::now();
        for n in 0..MAX as u64 + 1 {
            take(&mut s, 1 + n);
        }
        assert_eq!(s.dial_succeeded(1, "a", far_future(), now), Some(MAX));
        // The first connection is full: the waiter of the second dial keeps waiting, and
        // the next connect joins that dial.
        assert_eq!(
            take(&mut s, 900),
            Step::Join {
                id: 101,
                outcome: 1010
            }
        );
        assert_eq!(s.dial_succeeded(101, "b", far_future(), now), Some(2));
        assert_eq!(
            take(&mut s, 901),
            Step::Use {
                id: 101,
                handle: "b"
            }
        );
        // A tunnel on the first connection ends: its slot is free for the next connect.
        s.release(1, now);
        assert_eq!(take(&mut s, 902), Step::Use { id: 1, handle: "a" });
    }

    #[test]
    fn a_failed_dial_leaves_nothing_and_the_next_connect_dials_anew() {
        let mut s = State::default();
        for n in 1..=MAX as u64 {
            take(&mut s, n);
        }
        assert_eq!(s.end_dial(1), Some(MAX));
        // Its waiters release their places: nothing to release any more.
        for _ in 0..MAX {
            s.release(1, Instant::now());
        }
        assert!(s.is_unused());
        assert_eq!(take(&mut s, 7), Step::Dial);
        // A dial ended twice (its dialer and a waiter that saw the dialer go) is known once.
        assert_eq!(s.end_dial(7), Some(1));
        assert_eq!(s.end_dial(7), None);
        assert_eq!(
            s.dial_succeeded(7, "late", far_future(), Instant::now()),
            None
        );
        assert!(s.is_unused());
    }

    #[test]
    fn a_waiter_that_gives_up_frees_its_place_before_and_its_slot_after_the_dial() {
        let mut s = State::default();
        let now = Instant::now();
        for n in 1..=MAX as u64 {
            take(&mut s, n);
        }
        // Two waiters go before the dial ends: two more connects fit in that dial.
        s.release(1, now);
        s.release(1, now);
        assert_eq!(take(&mut s, 200), Step::Join { id: 1, outcome: 10 });
        assert_eq!(s.dial_succeeded(1, "a", far_future(), now), Some(MAX - 1));
        // One waiter goes after: its slot on the connection is free.
        s.release(1, now);
        assert_eq!(s.conns[0].active, MAX - 2);
        assert_eq!(take(&mut s, 201), Step::Use { id: 1, handle: "a" });
        assert_eq!(take(&mut s, 202), Step::Use { id: 1, handle: "a" });
        assert_eq!(take(&mut s, 203), Step::Dial);
    }

    #[test]
    fn a_connection_left_without_tunnels_is_idle_from_the_last_release() {
        let mut s = State::default();
        let start = Instant::now();
        take(&mut s, 1);
        take(&mut s, 2);
        s.dial_succeeded(1, "a", far_future(), start);
        let later = start + Duration::from_secs(5);
        s.release(1, later);
        assert_eq!(s.conns[0].idle_since, start, "one tunnel still open");
        s.release(1, later);
        assert_eq!((s.conns[0].active, s.conns[0].idle_since), (0, later));
        s.remove_conn(1);
        assert!(s.is_unused());
    }
}

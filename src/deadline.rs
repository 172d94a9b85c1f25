//! When a waiting call gives up: the one deadline type of the crate, used by
//! sends, receives, `wait_any`, the handshake and `connect`.

use std::time::{Duration, Instant};

/// When a waiting call gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// Do not wait at all.
    Now,
    /// Wait until this instant.
    At(Instant),
    /// Wait as long as it takes.
    Never,
}

impl Deadline {
    /// `timeout` from now. A timeout too large for the clock is no deadline
    /// at all.
    pub(crate) fn after(timeout: Duration) -> Deadline {
        Instant::now()
            .checked_add(timeout)
            .map_or(Deadline::Never, Deadline::At)
    }

    /// `after(timeout)`, or no deadline for `None`.
    pub(crate) fn within(timeout: Option<Duration>) -> Deadline {
        timeout.map_or(Deadline::Never, Deadline::after)
    }

    /// What is left before the deadline: `None` once it has passed (at
    /// once for [`Deadline::Now`]), `Some(Duration::MAX)` for `Never`.
    pub(crate) fn remaining(self) -> Option<Duration> {
        match self {
            Deadline::Now => None,
            Deadline::Never => Some(Duration::MAX),
            Deadline::At(at) => {
                let left = at.saturating_duration_since(Instant::now());
                (!left.is_zero()).then_some(left)
            }
        }
    }

    /// The next sleep: at most one `slice`, and no further than the deadline.
    /// `None` once the deadline has passed.
    pub(crate) fn slice(self, slice: Duration) -> Option<Duration> {
        self.remaining().map(|left| left.min(slice))
    }

    /// Whether the deadline has passed.
    pub(crate) fn has_passed(self) -> bool {
        self.remaining().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_timeouts_mean_no_deadline() {
        assert_eq!(Deadline::after(Duration::MAX), Deadline::Never);
        assert_eq!(Deadline::within(None), Deadline::Never);
        assert_eq!(
            Deadline::Never.slice(Duration::from_millis(5)),
            Some(Duration::from_millis(5))
        );
    }

    #[test]
    fn slices_stop_at_the_deadline() {
        assert_eq!(Deadline::Now.slice(Duration::from_secs(1)), None);
        assert!(Deadline::Now.has_passed());
        let soon = Deadline::after(Duration::from_secs(3600));
        let s = soon.slice(Duration::from_millis(100)).unwrap();
        assert_eq!(s, Duration::from_millis(100));
        let past = Deadline::At(Instant::now());
        assert!(past.has_passed());
        assert_eq!(past.slice(Duration::from_secs(1)), None);
    }
}

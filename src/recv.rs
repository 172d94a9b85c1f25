//! The receiving side of one end: taking the peer's messages, the receive
//! loop, and releasing what was read.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use crate::deadline::Deadline;
use crate::error::{Failure, Halt};
use crate::link::Link;
use crate::ring::{DescriptorConsumer, ReleaseProducer, Taken};
use crate::wait::{Condition, Waiter};
use crate::wake;
use crate::word::{Mine, Theirs, Word};

/// The receiving side of one end.
#[derive(Debug)]
pub(crate) struct RecvSide<W: Word = AtomicU32> {
    link: Arc<Link<W>>,
    descriptors: DescriptorConsumer,
    releases: ReleaseProducer,
    waiter: Waiter,
}

/// What a waiting receiver waits for: the peer's next message.
pub(crate) struct MessageReady<'a, W: Word>(&'a RecvSide<W>);

impl<W: Word> Condition<W> for MessageReady<'_, W> {
    fn flag(&self) -> Mine<'_, W> {
        self.0.link.own().rx_sleeping()
    }

    fn counter(&self) -> Theirs<'_, W> {
        self.0.link.peer().published()
    }

    fn idle(&self, seen: u32) -> bool {
        self.0.descriptors.nothing_published(seen)
    }

    /// The next descriptor's tag: it is stored before `published` and sits
    /// on the line the receiver reads next anyway.
    fn ready(&self) -> bool {
        self.0.descriptors.next_ready(self.0.link.peer())
    }
}

impl<W: Word> RecvSide<W> {
    /// The receiving side over `link`, whose first message from the peer
    /// (and first release) is number `start` (0 for a new channel).
    pub(crate) fn new(link: Arc<Link<W>>, start: u32) -> RecvSide<W> {
        let options = link.options();
        let waiter = Waiter::new(options.spin, options.wait_slice);
        RecvSide {
            link,
            descriptors: DescriptorConsumer::new(start),
            releases: ReleaseProducer::new(start),
            waiter,
        }
    }

    pub(crate) fn link(&self) -> &Arc<Link<W>> {
        &self.link
    }

    pub(crate) fn waiter(&self) -> &Waiter {
        &self.waiter
    }

    /// The condition this side sleeps on, for `wait_any`.
    pub(crate) fn condition(&self) -> MessageReady<'_, W> {
        MessageReady(self)
    }

    /// Messages taken from the peer so far (wrapping).
    pub(crate) fn received(&self) -> u32 {
        self.descriptors.consumed()
    }

    /// Takes the next message the peer published, waiting until `deadline`.
    /// Once the peer has closed (or died), messages it published before
    /// are still delivered, then `Disconnected`.
    ///
    /// # Errors
    ///
    /// `Expired` when nothing came in time, and the other [`Halt`]s.
    pub(crate) fn recv(&self, deadline: Deadline) -> Result<Taken, Halt> {
        let link = &*self.link;
        loop {
            if let Some(taken) = self.take()? {
                return Ok(taken);
            }
            if link.peer_closed() {
                // Everything published before `closed` is visible now.
                return self.take()?.ok_or(Halt::Disconnected);
            }
            if let Deadline::Now = deadline {
                self.waiter.poll_peer_if_due(link)?;
                if link.peer_closed() {
                    continue; // gone: drain what it sent, then Disconnected
                }
                return Err(Halt::Expired);
            }
            self.waiter.wait(link, &MessageReady(self), deadline)?;
        }
    }

    /// Takes the next message, if the peer has published one.
    fn take(&self) -> Result<Option<Taken>, Failure> {
        let link = &*self.link;
        link.enter()?;
        self.descriptors
            .take(link.peer(), link.own())
            .map_err(|p| link.fail(Failure::Protocol(p)))
    }

    /// Whether a non-waiting receive would return something other than
    /// "empty" now: a message, or the end of the channel.
    pub(crate) fn ready(&self) -> bool {
        let link = &*self.link;
        let cond = MessageReady(self);
        cond.ready()
            || !cond.idle(cond.counter().load())
            || link.peer_closed()
            || link.enter().is_err()
    }

    /// Tells the peer we are done with its message `(slot, seq)`, and wakes
    /// it if it sleeps waiting for space. In a process that does not own the
    /// end (a message inherited through fork), does nothing.
    pub(crate) fn release(&self, slot: u32, seq: u32) {
        let link = &*self.link;
        if !link.owned_here() {
            return;
        }
        let own = link.own();
        self.releases.release(own, slot, seq);
        wake::wake_peer(
            || self.releases.store_count(own),
            own.released(),
            link.peer().tx_sleeping(),
        );
    }
}

//! The work per message, for `scripts/msg-cost` to count under callgrind.
//! Both ends of one channel run in this thread, so no wait ever happens and
//! the count repeats exactly.
//!
//! - `echo N`: N 64-byte echoes (a request one way, the reply back);
//! - `stream N`: N 64-byte messages one way, sent in bursts of 64 and
//!   received after each burst (a stream, where releases come in batches);
//! - `lists N`: N messages of 50 texts (about 2 KiB) one way, each received
//!   and read before the next is sent;
//! - `segments N`: N messages of four 64-byte blobs one way, each blob in a
//!   segment of its own (first segments of 4 words), each received and read
//!   before the next is sent: the path of a message of several segments;
//! - `bare-echo N`: the floor of `echo`, with no channel: the same messages
//!   built by capnp on reused buffers, each passed through a 128-byte slot
//!   of atomics (copied in, its length stored with `Release` and loaded
//!   with `Acquire`, copied out), as a carried message is, and read.
//!
//! ```text
//! cargo run --release --example msg_cost -- echo 10000
//! cargo run --release --example msg_cost -- stream 10000
//! cargo run --release --example msg_cost -- lists 10000
//! cargo run --release --example msg_cost -- segments 10000
//! cargo run --release --example msg_cost -- bare-echo 10000
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use capnp::message::{Builder, Reader, ReaderOptions, ScratchSpaceHeapAllocator, SegmentArray};
use capnp::Word;
use capnp_shm::{Channel, Options};

/// Messages a stream sends before the receiver takes them.
const BURST: u64 = 64;

/// Texts in a `lists` message.
const ITEMS: u32 = 50;

/// Words a [`Slot`] holds, as a descriptor entry carries.
const SLOT_WORDS: usize = 14;

/// The `bare-echo` floor's transport: a segment's words and its length in
/// atomics, as a descriptor entry carries a small message.
#[derive(Default)]
struct Slot {
    words: [AtomicU64; SLOT_WORDS],
    /// The segment's length in words, stored after them.
    len: AtomicU64,
}

impl Slot {
    /// Copies in the one segment of `message`, which fits.
    fn put(&self, message: &Builder<&mut ScratchSpaceHeapAllocator<'_>>) {
        let output = message.get_segments_for_output();
        let segment = output[0];
        assert!(output.len() == 1 && segment.len() <= SLOT_WORDS * 8);
        for (word, bytes) in self.words.iter().zip(segment.chunks_exact(8)) {
            let bytes: [u8; 8] = bytes.try_into().expect("8 bytes");
            word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        // Release: publishes the words above.
        self.len.store(segment.len() as u64 / 8, Ordering::Release);
    }

    /// Copies the segment out into `into`; its bytes.
    fn take<'a>(&self, into: &'a mut [Word; SLOT_WORDS]) -> &'a [u8] {
        // Acquire: pairs with the Release in `put`.
        let len = usize::try_from(self.len.load(Ordering::Acquire)).unwrap_or(usize::MAX);
        let bytes = Word::words_to_bytes_mut(into);
        for (word, out) in self.words.iter().zip(bytes.chunks_exact_mut(8)) {
            out.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        &bytes[..len.min(SLOT_WORDS) * 8]
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "echo".into());
    let n: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let mut options = Options::new().spin(std::time::Duration::ZERO);
    if mode == "segments" {
        options = options.first_segment_words(4);
    }
    let (a, b) = Channel::pair_with(&options)?;
    let payload = [7u8; 64];
    let mut sum = 0u64;
    match mode.as_str() {
        "echo" => {
            for seq in 0..n {
                let mut request = a.message();
                request.set_root::<capnp::data::Owned>(&payload[..])?;
                a.send(request).map_err(|e| e.into_error())?;
                let got = b.recv()?;
                let data: capnp::data::Reader<'_> = got.get_root()?;
                let mut reply = b.message();
                reply.set_root::<capnp::data::Owned>(data)?;
                drop(got);
                b.send(reply).map_err(|e| e.into_error())?;
                let echoed = a.recv()?;
                let data: capnp::data::Reader<'_> = echoed.get_root()?;
                sum = sum.wrapping_add(u64::from(data[0]) + seq);
            }
        }
        "stream" => {
            let mut sent = 0;
            while sent < n {
                let burst = BURST.min(n - sent);
                for _ in 0..burst {
                    let mut m = a.message();
                    m.set_root::<capnp::data::Owned>(&payload[..])?;
                    a.send(m).map_err(|e| e.into_error())?;
                }
                for _ in 0..burst {
                    let got = b.recv()?;
                    let data: capnp::data::Reader<'_> = got.get_root()?;
                    sum = sum.wrapping_add(u64::from(data[0]));
                }
                sent += burst;
            }
        }
        "lists" => {
            // A larger message of many pointers, one way, one at a time: a
            // list of 50 texts (about 2 KiB), each read back.
            let text = "line item twenty-four ch";
            for _ in 0..n {
                let mut m = a.message();
                let mut list = m.initn_root::<capnp::text_list::Builder<'_>>(ITEMS);
                for i in 0..ITEMS {
                    list.set(i, text);
                }
                a.send(m).map_err(|e| e.into_error())?;
                let got = b.recv()?;
                let list: capnp::text_list::Reader<'_> = got.get_root()?;
                for item in list.iter() {
                    sum = sum.wrapping_add(item?.len() as u64);
                }
            }
        }
        "segments" => {
            for _ in 0..n {
                let mut m = a.message();
                let mut list = m.initn_root::<capnp::data_list::Builder<'_>>(4);
                for i in 0..4 {
                    list.set(i, &payload);
                }
                a.send(m).map_err(|e| e.into_error())?;
                let got = b.recv()?;
                let list: capnp::data_list::Reader<'_> = got.get_root()?;
                for item in list.iter() {
                    sum = sum.wrapping_add(u64::from(item?[0]));
                }
                sum = sum.wrapping_add(got.segments().count() as u64);
            }
        }
        "bare-echo" => {
            let (mut scratch_a, mut scratch_b) = (
                [capnp::word(0, 0, 0, 0, 0, 0, 0, 0); 128],
                [capnp::word(0, 0, 0, 0, 0, 0, 0, 0); 128],
            );
            let mut alloc_a =
                ScratchSpaceHeapAllocator::new(capnp::Word::words_to_bytes_mut(&mut scratch_a));
            let mut alloc_b =
                ScratchSpaceHeapAllocator::new(capnp::Word::words_to_bytes_mut(&mut scratch_b));
            let (there, back) = (Slot::default(), Slot::default());
            let mut copy = [capnp::word(0, 0, 0, 0, 0, 0, 0, 0); SLOT_WORDS];
            for seq in 0..n {
                let mut request = Builder::new(&mut alloc_a);
                request.set_root::<capnp::data::Owned>(&payload[..])?;
                there.put(&request);
                drop(request);
                let segments = [there.take(&mut copy)];
                let got = Reader::new(SegmentArray::new(&segments), ReaderOptions::new());
                let data: capnp::data::Reader<'_> = got.get_root()?;
                let mut reply = Builder::new(&mut alloc_b);
                reply.set_root::<capnp::data::Owned>(data)?;
                back.put(&reply);
                drop(reply);
                let segments = [back.take(&mut copy)];
                let echoed = Reader::new(SegmentArray::new(&segments), ReaderOptions::new());
                let data: capnp::data::Reader<'_> = echoed.get_root()?;
                sum = sum.wrapping_add(u64::from(data[0]) + seq);
            }
        }
        other => {
            return Err(
                format!("mode {other:?}: echo, stream, lists, segments or bare-echo").into(),
            )
        }
    }
    println!("{n} messages ({mode}), check {sum}");
    Ok(())
}

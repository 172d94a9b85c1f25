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
//!   before the next is sent: the path of a message of several segments.
//!
//! ```text
//! cargo run --release --example msg_cost -- echo 10000
//! cargo run --release --example msg_cost -- stream 10000
//! cargo run --release --example msg_cost -- lists 10000
//! cargo run --release --example msg_cost -- segments 10000
//! ```

use capnp_shm::{Channel, Options};

/// Messages a stream sends before the receiver takes them.
const BURST: u64 = 64;

/// Texts in a `lists` message.
const ITEMS: u32 = 50;

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
        other => return Err(format!("mode {other:?}: echo, stream, lists or segments").into()),
    }
    println!("{n} messages ({mode}), check {sum}");
    Ok(())
}

//! The work per message, for `scripts/msg-cost` to count under callgrind:
//! `N` 64-byte echoes between the two ends of one channel, both in this
//! thread (so no wait ever happens and the count repeats exactly).
//!
//! ```text
//! cargo run --release --example msg_cost -- 10000
//! ```

use capnp_shm::{Channel, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let options = Options::new().spin(std::time::Duration::ZERO);
    let (a, b) = Channel::pair_with(&options)?;
    let payload = [7u8; 64];
    let mut sum = 0u64;
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
    println!("{n} echoes, check {sum}");
    Ok(())
}

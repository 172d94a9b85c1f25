// The key-value service of kv.capnp, shared by the examples, the tests and
// the benchmark (each includes this file and kv_capnp.rs with `#[path]`).
// Written against capnp-rpc only: the same code serves over shared memory
// and over capnp-rpc's two-party network.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use capnp::Error;
use futures::channel::oneshot;

use crate::kv_capnp::{call_order, counter, key_value, sink, watcher};

/// The network counters a server reports through `networkStats`.
pub type StatsSource = Box<dyn Fn() -> (u64, u64)>;

/// The service.
#[derive(Default)]
pub struct KeyValue {
    map: RefCell<HashMap<String, Vec<u8>>>,
    watchers: RefCell<Vec<watcher::Client>>,
    /// `gather` calls waiting for their group to be complete.
    gathering: RefCell<Vec<oneshot::Sender<u32>>>,
    cancelled: Rc<Cell<u32>>,
    stats: Option<StatsSource>,
}

impl KeyValue {
    /// A service that reports `stats` (received in place, copied out).
    pub fn with_stats(stats: StatsSource) -> KeyValue {
        KeyValue {
            stats: Some(stats),
            ..KeyValue::default()
        }
    }
}

/// Counts a `hang` call dropped by its caller.
struct CountDrop(Rc<Cell<u32>>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.set(self.0.get() + 1);
    }
}

impl key_value::Server for KeyValue {
    async fn get(
        self: Rc<Self>,
        params: key_value::GetParams,
        mut results: key_value::GetResults,
    ) -> Result<(), Error> {
        let key = params.get()?.get_key()?.to_str()?;
        if let Some(value) = self.map.borrow().get(key) {
            results.get().set_value(value);
        }
        Ok(())
    }

    async fn put(
        self: Rc<Self>,
        params: key_value::PutParams,
        _: key_value::PutResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let key = p.get_key()?.to_str()?.to_string();
        let value = p.get_value()?.to_vec();
        let watchers = self.watchers.borrow().clone();
        for w in watchers {
            let mut req = w.changed_request();
            req.get().set_key(&key[..]);
            req.get().set_value(&value);
            req.send().promise.await?;
        }
        self.map.borrow_mut().insert(key, value);
        Ok(())
    }

    async fn counter(
        self: Rc<Self>,
        params: key_value::CounterParams,
        mut results: key_value::CounterResults,
    ) -> Result<(), Error> {
        let start = params.get()?.get_start();
        results
            .get()
            .set_counter(capnp_rpc::new_client(Counter(start)));
        Ok(())
    }

    async fn watch(
        self: Rc<Self>,
        params: key_value::WatchParams,
        _: key_value::WatchResults,
    ) -> Result<(), Error> {
        self.watchers
            .borrow_mut()
            .push(params.get()?.get_watcher()?);
        Ok(())
    }

    async fn sink(
        self: Rc<Self>,
        _: key_value::SinkParams,
        mut results: key_value::SinkResults,
    ) -> Result<(), Error> {
        results
            .get()
            .set_sink(capnp_rpc::new_client(Sink::default()));
        Ok(())
    }

    async fn hang(
        self: Rc<Self>,
        _: key_value::HangParams,
        _: key_value::HangResults,
    ) -> Result<(), Error> {
        let _counted = CountDrop(Rc::clone(&self.cancelled));
        futures::future::pending::<()>().await;
        Ok(())
    }

    async fn gather(
        self: Rc<Self>,
        params: key_value::GatherParams,
        mut results: key_value::GatherResults,
    ) -> Result<(), Error> {
        let count = params.get()?.get_count();
        let (tx, rx) = oneshot::channel();
        {
            let mut gathering = self.gathering.borrow_mut();
            gathering.push(tx);
            let n = u32::try_from(gathering.len()).unwrap_or(u32::MAX);
            if n >= count {
                for waiting in gathering.drain(..) {
                    let _ = waiting.send(n);
                }
            }
        }
        let arrived = rx
            .await
            .map_err(|_| Error::failed("gather abandoned".into()))?;
        // The parameters were held (in place, within the budget) until now.
        drop(params);
        results.get().set_arrived(arrived);
        Ok(())
    }

    async fn echo(
        self: Rc<Self>,
        params: key_value::EchoParams,
        mut results: key_value::EchoResults,
    ) -> Result<(), Error> {
        results.get().set_data(params.get()?.get_data()?);
        Ok(())
    }

    async fn reflect(
        self: Rc<Self>,
        params: key_value::ReflectParams,
        mut results: key_value::ReflectResults,
    ) -> Result<(), Error> {
        results.get().set_cap(params.get()?.get_cap()?);
        Ok(())
    }

    async fn blob(
        self: Rc<Self>,
        params: key_value::BlobParams,
        mut results: key_value::BlobResults,
    ) -> Result<(), Error> {
        let bytes = params.get()?.get_bytes();
        let data = results.get().init_data(bytes);
        // A copy per 251 bytes rather than a division per byte: the result
        // is made at memory speed, so the transports' costs show.
        let pattern: Vec<u8> = (0..251).map(blob_byte).collect();
        for chunk in data.chunks_mut(251) {
            chunk.copy_from_slice(&pattern[..chunk.len()]);
        }
        Ok(())
    }

    async fn ping(
        self: Rc<Self>,
        _: key_value::PingParams,
        _: key_value::PingResults,
    ) -> Result<(), Error> {
        Ok(())
    }

    async fn cancelled(
        self: Rc<Self>,
        _: key_value::CancelledParams,
        mut results: key_value::CancelledResults,
    ) -> Result<(), Error> {
        results.get().set_count(self.cancelled.get());
        Ok(())
    }

    async fn network_stats(
        self: Rc<Self>,
        _: key_value::NetworkStatsParams,
        mut results: key_value::NetworkStatsResults,
    ) -> Result<(), Error> {
        let (in_place, copied) = self.stats.as_ref().map_or((0, 0), |s| s());
        results.get().set_in_place(in_place);
        results.get().set_copied_out(copied);
        Ok(())
    }
}

/// Byte `i` of a `blob` result.
pub fn blob_byte(i: usize) -> u8 {
    u8::try_from(i % 251).unwrap_or(0)
}

/// A counter capability.
pub struct Counter(pub i64);

impl counter::Server for Counter {
    async fn get(
        self: Rc<Self>,
        _: counter::GetParams,
        mut results: counter::GetResults,
    ) -> Result<(), Error> {
        results.get().set_value(self.0);
        Ok(())
    }

    async fn next(
        self: Rc<Self>,
        _: counter::NextParams,
        mut results: counter::NextResults,
    ) -> Result<(), Error> {
        results
            .get()
            .set_counter(capnp_rpc::new_client(Counter(self.0 + 1)));
        Ok(())
    }
}

/// A streaming sink.
#[derive(Default)]
pub struct Sink {
    bytes: Cell<u64>,
    writes: Cell<u64>,
}

impl sink::Server for Sink {
    async fn write(self: Rc<Self>, params: sink::WriteParams) -> Result<(), Error> {
        let n = params.get()?.get_chunk()?.len() as u64;
        self.bytes.set(self.bytes.get() + n);
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }

    async fn done(
        self: Rc<Self>,
        _: sink::DoneParams,
        mut results: sink::DoneResults,
    ) -> Result<(), Error> {
        results.get().set_bytes(self.bytes.get());
        results.get().set_writes(self.writes.get());
        Ok(())
    }
}

/// What a [`Recorder`] was told: (key, value) pairs in order.
pub type Seen = Rc<RefCell<Vec<(String, Vec<u8>)>>>;

/// A watcher that records what it is told.
#[derive(Default)]
pub struct Recorder {
    pub seen: Seen,
}

impl watcher::Server for Recorder {
    async fn changed(
        self: Rc<Self>,
        params: watcher::ChangedParams,
        _: watcher::ChangedResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        self.seen
            .borrow_mut()
            .push((p.get_key()?.to_string()?, p.get_value()?.to_vec()));
        Ok(())
    }
}

/// Counts calls, failing one that comes out of order.
#[derive(Default)]
pub struct CallOrder {
    pub next: Cell<u32>,
}

impl call_order::Server for CallOrder {
    async fn next(
        self: Rc<Self>,
        params: call_order::NextParams,
        mut results: call_order::NextResults,
    ) -> Result<(), Error> {
        let expected = params.get()?.get_expected();
        let n = self.next.get();
        if expected != n {
            return Err(Error::failed(format!(
                "call {expected} arrived as call {n}"
            )));
        }
        self.next.set(n + 1);
        results.get().set_n(n);
        Ok(())
    }
}

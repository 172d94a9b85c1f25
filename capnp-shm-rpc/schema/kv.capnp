# The service of the examples, tests and benchmark: a key-value store
# with capabilities that exercise what Cap'n Proto RPC does.
# Regenerate kv_capnp.rs with ../scripts/regen-schema (needs the capnp tool).
@0xc5b3d4b0a6a1e0f7;

interface KeyValue {
  get @0 (key :Text) -> (value :Data);
  put @1 (key :Text, value :Data) -> ();
  # A counter capability starting at `start`: for pipelined chains.
  counter @2 (start :Int64) -> (counter :Counter);
  # The server calls `watcher.changed` on every later `put`: a capability
  # passed from the client to the server.
  watch @3 (watcher :Watcher) -> ();
  # A sink for streaming calls with flow control.
  sink @4 () -> (sink :Sink);
  # Never returns (until the caller drops the call).
  hang @5 () -> ();
  # Returns once `count` calls of `gather` are waiting at the same time:
  # the server holds every one's parameters until then.
  gather @6 (count :UInt32, pad :Data) -> (arrived :UInt32);
  echo @7 (data :Data) -> (data :Data);
  # Gives back the capability it was given (for embargoes).
  reflect @8 (cap :CallOrder) -> (cap :CallOrder);
  # A result of `bytes` bytes.
  blob @9 (bytes :UInt32) -> (data :Data);
  # The trivial call.
  ping @10 () -> ();
  # How many calls of `hang` were dropped by their callers so far.
  cancelled @11 () -> (count :UInt32);
  # The server's network counters (messages read in place, copied out).
  networkStats @12 () -> (inPlace :UInt64, copiedOut :UInt64);
}

interface Counter {
  get @0 () -> (value :Int64);
  # A counter one higher.
  next @1 () -> (counter :Counter);
}

interface Watcher {
  changed @0 (key :Text, value :Data) -> ();
}

interface Sink {
  write @0 (chunk :Data) -> stream;
  done @1 () -> (bytes :UInt64, writes :UInt64);
}

# Counts the calls it gets and fails one that comes out of order.
interface CallOrder {
  next @0 (expected :UInt32) -> (n :UInt32);
}

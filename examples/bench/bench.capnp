# Messages used by the capnp-shm benchmark (examples/bench/main.rs).
# Regenerate bench_capnp.rs with ./regenerate.sh after editing.
@0xd3b5a1f0c2e4b697;

# Workloads 1-3: a sequence number and a payload of N bytes.
struct Blob {
  seq @0 :UInt64;
  payload @1 :Data;
}

# Workload 4: a structured message, built and read through the typed API.
struct Order {
  id @0 :UInt64;
  customer @1 :Customer;
  items @2 :List(LineItem);
  note @3 :Text;
  placedAtMicros @4 :UInt64;
}

struct Customer {
  id @0 :UInt64;
  name @1 :Text;
  email @2 :Text;
  address @3 :Address;
}

struct Address {
  street @0 :Text;
  city @1 :Text;
  postcode @2 :Text;
  country @3 :Text;
}

struct LineItem {
  sku @0 :Text;
  description @1 :Text;
  quantity @2 :UInt32;
  unitPriceCents @3 :UInt64;
  discount @4 :Float32;
  tags @5 :List(Text);
}

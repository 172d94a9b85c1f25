#!/usr/bin/env bash
# Regenerates bench_capnp.rs from bench.capnp. Needs the `capnp` tool
# (Debian: apt-get install capnproto) and the Rust plugin
# (cargo install capnpc --version '^0.27' --bin capnpc-rust).
# The crate, its tests and the benchmark build from the checked-in output;
# only a change to the schema needs this script.
set -euo pipefail
cd "$(dirname "$0")"
capnp compile -orust:. bench.capnp
echo "wrote $(pwd)/bench_capnp.rs"

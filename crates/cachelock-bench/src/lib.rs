//! cachelock's benchmarks (in `benches/`; they print medians), kept in a
//! crate of their own so that building the library, its tests and its
//! examples never compiles benchmark-only dependencies.
//!
//! `cargo bench -p cachelock-bench --bench memory` (and `memoize`,
//! `redis_round_trips`, `memcached_round_trips`; the per-backend benches
//! read the test servers' variables: `source <(scripts/services env)`).

//! The `cachelock` command (see issue: the CLI). Placeholder until the CLI lands.

fn main() {}

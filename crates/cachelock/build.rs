//! Declares the `fuzzing` cfg that cargo-fuzz sets (`--cfg fuzzing`), under
//! which the fuzz targets reach the crate's internal codecs.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}

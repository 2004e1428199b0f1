//! Ketama-style consistent hashing: which server holds a key.
//!
//! Each server gets [`POINTS_PER_SERVER`] points on a 32-bit ring, taken
//! from SHA-256 digests of `"<server>-<n>"`; a key belongs to the first
//! point at or after the first 32 bits of its own SHA-256. Adding or
//! removing one of N servers moves about 1/N of the keys. The layout
//! depends only on the server names (as written in the URL), not on their
//! order, so every client given the same servers agrees.

use sha2::{Digest, Sha256};

/// Points each server gets on the ring (as ketama: 160).
pub(crate) const POINTS_PER_SERVER: usize = 160;

/// A hash ring over server indices.
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    /// `(point, server index)`, sorted by point.
    points: Vec<(u32, usize)>,
    servers: usize,
}

fn words(digest: &[u8]) -> impl Iterator<Item = u32> + '_ {
    digest
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

impl Ring {
    /// Builds the ring for servers named `names` (index = position).
    pub(crate) fn new<S: AsRef<str>>(names: &[S]) -> Self {
        let mut points = Vec::with_capacity(names.len() * POINTS_PER_SERVER);
        for (index, name) in names.iter().enumerate() {
            // Each SHA-256 digest gives 8 points.
            for n in 0..POINTS_PER_SERVER.div_ceil(8) {
                let digest = Sha256::digest(format!("{}-{n}", name.as_ref()).as_bytes());
                points.extend(words(&digest).map(|p| (p, index)));
            }
        }
        // Equal points (astronomically rare) go to the lower index.
        points.sort_unstable();
        Self {
            points,
            servers: names.len(),
        }
    }

    /// The index of the server that holds `key`.
    pub(crate) fn server_for(&self, key: &str) -> usize {
        if self.servers <= 1 {
            return 0;
        }
        let digest = Sha256::digest(key.as_bytes());
        let hash = words(&digest).next().unwrap_or(0);
        let at = self.points.partition_point(|&(p, _)| p < hash);
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map_or(0, |&(_, server)| server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    #[test]
    fn spreads_keys_evenly() {
        let ring = Ring::new(&names(3));
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            counts[ring.server_for(&format!("key-{i}"))] += 1;
        }
        for c in counts {
            assert!((2_300..=4_400).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn adding_a_fourth_server_moves_about_a_quarter() {
        let three = Ring::new(&names(3));
        let four = Ring::new(&names(4));
        let mut moved = 0;
        for i in 0..10_000 {
            let key = format!("cachelock:key:{i}");
            let (a, b) = (three.server_for(&key), four.server_for(&key));
            if a != b {
                assert_eq!(b, 3, "a key may only move to the new server");
                moved += 1;
            }
        }
        let share = moved as f64 / 10_000.0;
        eprintln!("adding a 4th server moved {:.1}% of keys", share * 100.0);
        assert!((0.15..=0.35).contains(&share), "moved {share}");
    }

    #[test]
    fn layout_ignores_server_order() {
        let a = Ring::new(&["x:1", "y:2", "z:3"]);
        let b = Ring::new(&["z:3", "x:1", "y:2"]);
        let name_a = ["x:1", "y:2", "z:3"];
        let name_b = ["z:3", "x:1", "y:2"];
        for i in 0..1000 {
            let key = format!("k{i}");
            assert_eq!(name_a[a.server_for(&key)], name_b[b.server_for(&key)]);
        }
    }

    #[test]
    fn single_server_takes_everything() {
        let ring = Ring::new(&["only:1"]);
        assert_eq!(ring.server_for("anything"), 0);
        assert_eq!(Ring::new::<&str>(&[]).server_for("k"), 0);
    }
}

//! Small numeric helpers: a seeded PRNG (the bench must be repeatable without a `rand`
//! dependency), medians and percentiles, and human-readable durations.

use std::time::Duration;

/// splitmix64: tiny, fast, and good enough to pick rows and users.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A value in `1..=n`.
    pub fn one_to(&mut self, n: u32) -> u32 {
        1 + (self.next_u64() % u64::from(n.max(1))) as u32
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// The splitmix64 finaliser: a well-mixed 64-bit value from any input.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic hash of a few numbers: the keyspace is a function of its layout.
pub fn hash(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5EED_u64, |acc, part| {
        mix(acc ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    })
}

pub fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// The `p`-th percentile (0–100) by nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `0.61 s`, `12.3 ms`, `850 µs`.
pub fn show(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds >= 100.0 {
        format!("{seconds:.0} s")
    } else if seconds >= 1.0 {
        format!("{seconds:.2} s")
    } else if seconds >= 0.001 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{:.0} µs", seconds * 1e6)
    }
}

/// `1,000,000`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The median (by nearest rank, like [`percentile`]) of `with[i] / without[i]` over the rounds.
/// The bench runs an odd number of rounds, so it is the middle ratio.
pub fn median_ratio(with: &[Duration], without: &[Duration]) -> f64 {
    let ratios: Vec<f64> = with
        .iter()
        .zip(without)
        .map(|(w, o)| w.as_secs_f64() / o.as_secs_f64().max(1e-9))
        .collect();
    percentile(&ratios, 50.0)
}

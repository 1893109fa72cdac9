//! The host's TSC frequency, which the daemon passes to TCG guests
//! (`tsc_early_khz=`) so their kernel does not calibrate it.

/// The host's TSC frequency in kHz, measured once (about 120 ms) and cached;
/// `None` off x86_64 or when the measurement makes no sense.
///
/// Under TCG the guest's TSC ticks at the host's rate, but the guest kernel
/// calibrates it against the emulated PIT, which fails when the host is busy
/// ("tsc: Unable to calibrate against PIT"); the boot then hangs. Passing
/// `tsc_early_khz=<this>` on the kernel command line skips that calibration,
/// so the daemon appends it to [`Manifest::cmdline`](crate::Manifest::cmdline) (see docs/image.md).
pub fn host_tsc_khz() -> Option<u64> {
    static CACHE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *CACHE.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::time::{Duration, Instant};
    // `_rdtsc` is unsafe on older toolchains (MSRV 1.80), safe on current ones.
    #[allow(unused_unsafe)]
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    // A (tsc, instant) pair: the clock read bracketed by two TSC reads, the
    // tightest bracket of a few tries (a preemption widens it).
    fn sample() -> Option<(u64, Instant)> {
        let mut best: Option<(u64, u64, Instant)> = None;
        for _ in 0..20 {
            let a = rdtsc();
            let t = Instant::now();
            let b = rdtsc();
            if b >= a && best.is_none_or(|(w, _, _)| b - a < w) {
                best = Some((b - a, a + (b - a) / 2, t));
            }
        }
        best.map(|(_, tsc, t)| (tsc, t))
    }
    let mut khz = Vec::new();
    for _ in 0..3 {
        let (c0, t0) = sample()?;
        std::thread::sleep(Duration::from_millis(40));
        let (c1, t1) = sample()?;
        let ns = t1.duration_since(t0).as_nanos();
        if ns == 0 || c1 <= c0 {
            return None;
        }
        khz.push(((c1 - c0) as u128 * 1_000_000 / ns) as u64);
    }
    khz.sort_unstable();
    Some(khz[1]).filter(|k| (100_000..=20_000_000).contains(k))
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tsc_khz_is_plausible_and_cached() {
        let k = host_tsc_khz().expect("x86_64 host has a TSC");
        assert!((100_000..=20_000_000).contains(&k), "{k}");
        assert_eq!(host_tsc_khz(), Some(k));
    }
}

//! The instruction-set paths of the kernels, detected at run time and selectable with the
//! environment variable `SHRINK_ISA` (`portable`, `avx2`, `avx512`, `avx512-vnni` on x86-64;
//! `neon`, `neon-dot`, `neon-i8mm` on aarch64), so each path can be run and measured on one
//! machine that has it.
//!
//! One choice covers every kernel: the f32 kernels use the widest floating-point path it allows
//! ([`Isa::f32_path`]), the integer ones the widest integer path ([`Isa::int8_path`]) — AVX-512
//! without VNNI has no integer path of its own, so `avx512` runs the integer kernels on AVX2.
//!
//! Tests run every path the CPU has ([`Isa::available_for_test`]); a path named in
//! `SHRINK_REQUIRE_ISA` (a comma-separated list, e.g. `avx2,avx512,avx512-vnni`) must be there, or
//! the test fails instead of skipping it.

use std::cell::Cell;
use std::sync::OnceLock;

/// A code path of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust (`mul_add`), on any CPU; integers by a plain loop (a GEMM, no direct
    /// convolution).
    Portable,
    /// AVX2 and FMA: 8 lanes of f32; integers as exact i16 pair products (`vpmaddwd`).
    Avx2,
    /// AVX-512F and FMA: 16 lanes of f32; integers as on AVX2.
    Avx512,
    /// AVX-512 (F, BW, VL, DQ) with VNNI: f32 as AVX-512, integers by `vpdpbusd`.
    Avx512Vnni,
    /// aarch64 NEON: integers as exact i16 products (`smull`) summed in pairs (`sadalp`); f32 by
    /// fused multiply-adds (`fmla`, the direct convolution's positions algorithm).
    Neon,
    /// NEON with the dot-product extension (FEAT_DotProd, Armv8.2+): integers by `sdot`, four
    /// i8 products per i32 lane, the u8 activations offset to i8 and the offset added back.
    NeonDot,
    /// NEON with FEAT_I8MM (Armv8.6+): integers by `usdot`, u8 × i8 products directly.
    NeonI8mm,
}

impl Isa {
    /// Every path, slowest first on each architecture (x86-64's, then aarch64's).
    pub const ALL: [Isa; 7] =
        [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni, Isa::Neon, Isa::NeonDot, Isa::NeonI8mm];

    /// The name `SHRINK_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dot",
            Isa::NeonI8mm => "neon-i8mm",
        }
    }

    /// The path the f32 kernels take under this choice: `Portable`, `Avx2`, `Avx512` or `Neon`
    /// (the f32 kernels use no dot-product or i8mm instruction).
    pub fn f32_path(self) -> Isa {
        match self {
            Isa::Avx512Vnni => Isa::Avx512,
            Isa::NeonDot | Isa::NeonI8mm => Isa::Neon,
            other => other,
        }
    }

    /// The path the integer kernels take under this choice: `Portable`, `Avx2`, `Avx512Vnni`
    /// or a NEON one.
    pub fn int8_path(self) -> Isa {
        match self {
            Isa::Avx512 => Isa::Avx2,
            other => other,
        }
    }

    /// The path named `name`.
    pub fn parse(name: &str) -> Option<Isa> {
        Self::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether this CPU runs the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx512.available()
                    && Isa::Avx2.available()
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => Isa::Neon.available() && std::arch::is_aarch64_feature_detected!("dotprod"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonI8mm => Isa::Neon.available() && std::arch::is_aarch64_feature_detected!("i8mm"),
            #[allow(unreachable_patterns)] // every path is matched on neither architecture
            _ => false,
        }
    }

    /// Whether a test can run the path here. Where it cannot, the test says so on stderr and
    /// goes on without it, unless `SHRINK_REQUIRE_ISA` names it: then this panics.
    ///
    /// # Panics
    /// When `SHRINK_REQUIRE_ISA` names this path and the CPU lacks it.
    pub fn available_for_test(self, test: &str) -> bool {
        if self.available() {
            return true;
        }
        let required = std::env::var("SHRINK_REQUIRE_ISA").unwrap_or_default();
        assert!(
            !required.split(',').any(|r| r.trim() == self.name()),
            "{test}: SHRINK_REQUIRE_ISA names {}, but this CPU lacks it",
            self.name()
        );
        eprintln!("{test}: the {} path is skipped: this CPU lacks it", self.name());
        false
    }
}

/// The best path this CPU has.
pub fn best() -> Isa {
    Isa::ALL.into_iter().rev().find(|i| i.available()).unwrap_or(Isa::Portable)
}

/// `SHRINK_ISA` read and checked: `Ok(None)` when unset, an error naming the value when it names
/// no path or one this CPU lacks (programs check this once at start and exit with it).
///
/// # Errors
/// The message says what `SHRINK_ISA` holds and which paths this CPU has.
pub fn from_env() -> Result<Option<Isa>, String> {
    let Ok(value) = std::env::var("SHRINK_ISA") else { return Ok(None) };
    let have: Vec<&str> = Isa::ALL.into_iter().filter(|i| i.available()).map(Isa::name).collect();
    match Isa::parse(value.trim()) {
        Some(isa) if isa.available() => Ok(Some(isa)),
        Some(isa) => Err(format!("SHRINK_ISA={value}: this CPU lacks {}; it has {}", isa.name(), have.join(", "))),
        None => Err(format!(
            "SHRINK_ISA={value} names no kernel path: expected one of {} (this CPU has {})",
            Isa::ALL.map(Isa::name).join(", "),
            have.join(", ")
        )),
    }
}

thread_local! {
    static OVERRIDE: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// The path the kernels use: inside [`with_selected`] its path, else `SHRINK_ISA` where it names
/// one this CPU has, else [`best`] (programs report a bad `SHRINK_ISA` through [`from_env`]
/// before they get here). Kernels read it when they are built and keep their path.
pub fn selected() -> Isa {
    static SELECTED: OnceLock<Isa> = OnceLock::new();
    OVERRIDE.with(Cell::get).unwrap_or_else(|| *SELECTED.get_or_init(|| from_env().ok().flatten().unwrap_or_else(best)))
}

/// Runs `f` with `isa` as this thread's [`selected`] path: the kernels (and plans) built inside
/// run on it from then on, so one process can build the same model on every path and time them
/// side by side (`cargo xtask bench isa`).
///
/// # Panics
/// When the CPU lacks `isa`.
pub fn with_selected<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    assert!(isa.available(), "this CPU lacks {isa:?}");
    let before = OVERRIDE.with(|o| o.replace(Some(isa)));
    // Restored even if `f` unwinds.
    struct Restore(Option<Isa>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_best_path_is_available() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("sse"), None);
        assert!(best().available());
        assert!(Isa::Portable.available());
        for isa in Isa::ALL {
            assert!(
                [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon].contains(&isa.f32_path()) && isa.f32_path() <= isa
            );
            assert!(isa.int8_path() != Isa::Avx512 && isa.int8_path() <= isa);
        }
        // A CPU has one architecture's paths.
        let x86 = [Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];
        let arm = [Isa::Neon, Isa::NeonDot, Isa::NeonI8mm];
        assert!(!(x86.iter().any(|i| i.available()) && arm.iter().any(|i| i.available())));
        assert_eq!(Isa::Neon.available(), cfg!(target_arch = "aarch64"));
    }

    #[test]
    fn a_path_selected_for_a_scope_is_restored_after_it() {
        let outside = selected();
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            assert_eq!(with_selected(isa, selected), isa);
            assert_eq!(with_selected(isa, || with_selected(Isa::Portable, selected)), Isa::Portable);
            assert_eq!(selected(), outside);
        }
    }
}

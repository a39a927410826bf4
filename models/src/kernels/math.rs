//! Branch-free float math that the compiler vectorises, and a way to compile a loop for the
//! widest vector unit the CPU has (chosen at run time, so one binary runs everywhere).

/// Defines `fn $name(args)` that runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU
/// has them and for the baseline otherwise. The body and everything it calls must be
/// `#[inline(always)]`, so they are compiled inside the feature-enabled function.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }

                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // Safety: the CPU supports every feature the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // Safety: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `e^x` to about 1 ulp (Cephes' expf: `2^n · e^r` with `|r| ≤ ln2/2` and a degree-6
/// polynomial for `e^r`). Exactly 0 below −87.3, so a −∞ mask gives 0; saturates at 88.3.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a branch or call.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.3);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n read from the bits of `shifted` (ROUND + n, exact): a float-to-int `as` cast saturates,
    // which the compiler cannot vectorise.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        er * scale
    }
}

/// `ln(x)` for positive normal `x`, to about 1 ulp (Cephes' logf: `x = m·2^e` with `m` in
/// [√½, √2) and a degree-8 polynomial for `ln(m)`).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let bits = x.to_bits() as i32;
    // x = m·2^e with m in [½, 1), then moved to [√½, √2) and shifted by 1.
    let e = ((bits >> 23) & 0xff) - 126;
    let m = f32::from_bits(((bits & 0x007f_ffff) | 0x3f00_0000) as u32);
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let e = (e - small as i32) as f32;
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    let z = m * m;
    let mut y = 7.037_683_6e-2;
    y = y * m - 1.151_461_e-1;
    y = y * m + 1.167_699_9e-1;
    y = y * m - 1.242_014_1e-1;
    y = y * m + 1.424_932_3e-1;
    y = y * m - 1.666_805_8e-1;
    y = y * m + 2.000_071_4e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333e-1;
    y = y * m * z - 2.121_944_4e-4 * e - 0.5 * z;
    m + y + 0.693_359_4 * e
}

/// `softplus(x) = ln(1 + e^x)`, without overflow for large `x` and without losing the tiny
/// value for very negative `x` (`ln(1 + y)` as `y·ln(u)/(u − 1)`, u = 1 + y, Goldberg's trick).
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    let y = exp(-x.abs());
    let u = 1.0 + y;
    let ln_1p = if u == 1.0 { y } else { ln(u) * y / (u - 1.0) };
    x.max(0.0) + ln_1p
}

/// The logistic function `1 / (1 + e^{−x})`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn ln_and_softplus_match_libm() {
        let mut x = 1e-30f32;
        while x < 1e30 {
            let want = (x as f64).ln();
            assert!((ln(x) as f64 - want).abs() <= 2e-7 * want.abs().max(1.0), "ln({x})");
            x *= 1.37;
        }
        let mut x = -40.0f32;
        while x < 40.0 {
            let want = (x as f64).exp().ln_1p();
            assert!(((softplus(x) as f64 - want) / want).abs() < 1e-6, "softplus({x}): {} vs {want}", softplus(x));
            x += 0.0093;
        }
        assert_eq!(softplus(200.0), 200.0);
    }

    #[test]
    fn sigmoid_matches_libm() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - want).abs() < 2e-7, "sigmoid({x})");
            x += 0.0071;
        }
    }
}

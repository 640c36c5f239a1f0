//! Calibration: observers that watch the values reaching a layer and choose the range its
//! integer kernel will represent.

use serde::{Deserialize, Serialize};

use crate::{QuantParams, QuantScheme, params_for_range};

/// How an observer turns what it saw into a range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Calibrator {
    /// The smallest and largest value seen.
    MinMax,
    /// Exponential moving average of each batch's min and max (`momentum` weights the past).
    MovingAverage {
        /// Weight of the running value, in `[0, 1)`.
        momentum: f32,
    },
    /// The `percentile`-th percentile of the values (and the `100 - percentile`-th below):
    /// clips rare outliers.
    Percentile {
        /// In `(50, 100]`, e.g. 99.99.
        percentile: f64,
    },
    /// The clipping range that minimises the mean squared quantization error of the values seen.
    Mse,
    /// The clipping threshold whose quantized distribution is closest, in KL divergence, to the
    /// histogram of the values seen (TensorRT's entropy calibration): 2048 bins of `|x|`.
    Kl,
}

/// Values kept per observer for the percentile and MSE calibrators: a deterministic strided
/// sample, so memory stays bounded whatever the number of batches.
const SAMPLE_CAP: usize = 1 << 18;

/// Watches the values of one tensor over calibration batches.
#[derive(Clone, Debug)]
pub struct Observer {
    calibrator: Calibrator,
    min: f32,
    max: f32,
    batches: usize,
    sample: Vec<f32>,
    /// Keep one value in `stride`.
    stride: usize,
    /// Position in the stride across calls.
    phase: usize,
}

impl Observer {
    /// An observer that will choose its range with `calibrator`.
    pub fn new(calibrator: Calibrator) -> Self {
        Self {
            calibrator,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            batches: 0,
            sample: Vec::new(),
            stride: 1,
            phase: 0,
        }
    }

    /// Takes in one batch of values. Returns the first non-finite value's index, if any (the
    /// caller names the layer; the batch is not recorded).
    pub fn observe(&mut self, values: &[f32]) -> Result<(), usize> {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(i);
        }
        if values.is_empty() {
            return Ok(());
        }
        let (lo, hi) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        match self.calibrator {
            Calibrator::MovingAverage { momentum } if self.batches > 0 => {
                self.min = momentum * self.min + (1.0 - momentum) * lo;
                self.max = momentum * self.max + (1.0 - momentum) * hi;
            }
            _ => {
                self.min = self.min.min(lo);
                self.max = self.max.max(hi);
            }
        }
        self.batches += 1;
        if matches!(self.calibrator, Calibrator::Percentile { .. } | Calibrator::Mse | Calibrator::Kl) {
            let mut i = (self.stride - self.phase % self.stride) % self.stride;
            while i < values.len() {
                self.sample.push(values[i]);
                i += self.stride;
            }
            self.phase = (self.phase + values.len()) % self.stride;
            while self.sample.len() > SAMPLE_CAP {
                // Halve the sample, keep every other value from now on.
                let mut k = 0;
                self.sample.retain(|_| {
                    k += 1;
                    k % 2 == 1
                });
                self.stride *= 2;
                self.phase = 0;
            }
        }
        Ok(())
    }

    /// Number of batches observed.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// The range chosen, or `None` if nothing was observed.
    pub fn range(&self, scheme: QuantScheme) -> Option<(f32, f32)> {
        if self.batches == 0 {
            return None;
        }
        Some(match self.calibrator {
            Calibrator::MinMax | Calibrator::MovingAverage { .. } => (self.min, self.max),
            Calibrator::Percentile { percentile } => {
                let mut s = self.sample.clone();
                s.sort_by(f32::total_cmp);
                let at = |q: f64| s[((q / 100.0) * (s.len() - 1) as f64).round() as usize];
                (at(100.0 - percentile).min(0.0), at(percentile).max(0.0))
            }
            Calibrator::Mse => mse_range(&self.sample, self.min, self.max, scheme),
            Calibrator::Kl => {
                let (qmin, qmax) = scheme.range();
                let levels = (qmax - qmin + 1) as usize;
                // Non-negative values use every level on [0, T]; signed ones half on each side.
                let t = kl_threshold(&self.sample, if self.min >= 0.0 { levels } else { levels / 2 });
                (self.min.max(-t).min(0.0), self.max.min(t).max(0.0))
            }
        })
    }

    /// The quantization parameters for `scheme` over the chosen range.
    pub fn params(&self, scheme: QuantScheme) -> Option<QuantParams> {
        self.range(scheme).map(|(lo, hi)| params_for_range(lo, hi, scheme))
    }
}

/// Mean squared error of quantizing `values` with `p`.
pub fn quantization_mse(values: &[f32], p: QuantParams, scheme: QuantScheme) -> f64 {
    let (qmin, qmax) = scheme.range();
    let sum: f64 = values
        .iter()
        .map(|&v| {
            let q = ((v / p.scale).round() as i32 + p.zero_point).clamp(qmin, qmax);
            let e = (p.scale * (q - p.zero_point) as f32 - v) as f64;
            e * e
        })
        .sum();
    sum / values.len().max(1) as f64
}

/// Bins of the `|x|` histogram the KL calibrator compares distributions on.
const KL_BINS: usize = 2048;

/// The threshold `T` on `|x|` that minimises `KL(P ‖ Q)`, where `P` is the histogram of `|x|`
/// over `[0, T]` (the values beyond folded into the last bin) and `Q` is `P` merged into `levels`
/// quantization levels and spread back over the bins that were non-empty (TensorRT's entropy
/// calibration, 2048 bins; the candidates run from `levels` bins to all of them).
pub fn kl_threshold(values: &[f32], levels: usize) -> f32 {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 || values.is_empty() {
        return max;
    }
    let width = max / KL_BINS as f32;
    let mut hist = vec![0f64; KL_BINS];
    for v in values {
        hist[((v.abs() / width) as usize).min(KL_BINS - 1)] += 1.0;
    }
    let mut best = (KL_BINS, f64::INFINITY);
    for i in (levels.min(KL_BINS)..=KL_BINS).step_by(8) {
        let mut p: Vec<f64> = hist[..i].to_vec();
        p[i - 1] += hist[i..].iter().sum::<f64>();
        // Q: the clipped histogram (without the folded tail: clipping is what Q cannot show)
        // merged into `levels` groups, each group's mass spread evenly over its non-empty bins.
        let mut q = vec![0f64; i];
        for g in 0..levels {
            let (start, end) = (g * i / levels, ((g + 1) * i / levels).max(g * i / levels + 1).min(i));
            let mass: f64 = hist[start..end].iter().sum();
            let nonempty = hist[start..end].iter().filter(|&&v| v > 0.0).count();
            for k in (start..end).filter(|&k| hist[k] > 0.0) {
                q[k] = mass / nonempty as f64;
            }
        }
        let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
        let kl: f64 = p
            .iter()
            .zip(&q)
            .filter(|(a, _)| **a > 0.0)
            .map(|(a, b)| {
                let (a, b) = (a / sp, (b / sq).max(1e-12));
                a * (a / b).ln()
            })
            .sum();
        if kl < best.1 {
            best = (i, kl);
        }
    }
    best.0 as f32 * width
}

/// Shrinks `[min, max]` by a common factor (1, 0.97, 0.97², … down to about 0.001) and keeps
/// the factor with the least quantization error on `sample`.
fn mse_range(sample: &[f32], min: f32, max: f32, scheme: QuantScheme) -> (f32, f32) {
    let mut best = ((min, max), f64::INFINITY);
    for step in 0..=220 {
        let f = 0.97f32.powi(step);
        let range = (min * f, max * f);
        let err = quantization_mse(sample, params_for_range(range.0, range.1, scheme), scheme);
        if err < best.1 {
            best = (range, err);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Granularity;

    const U8: QuantScheme = QuantScheme { bits: 8, symmetric: false, granularity: Granularity::PerTensor };

    #[test]
    fn min_max_and_moving_average_match_hand_computed_values() {
        let mut o = Observer::new(Calibrator::MinMax);
        o.observe(&[0.0, 2.0, -1.0]).unwrap();
        o.observe(&[4.0, 1.0]).unwrap();
        assert_eq!(o.range(U8), Some((-1.0, 4.0)));
        let p = o.params(U8).unwrap();
        assert!((p.scale - 5.0 / 255.0).abs() < 1e-7);
        assert_eq!(p.zero_point, 51); // round(1 / (5/255)) = round(51.0)

        let mut o = Observer::new(Calibrator::MovingAverage { momentum: 0.5 });
        o.observe(&[0.0, 2.0]).unwrap();
        o.observe(&[0.0, 4.0]).unwrap();
        assert_eq!(o.range(U8), Some((0.0, 3.0)));
    }

    #[test]
    fn percentile_clips_an_outlier_and_mse_beats_min_max() {
        // Exponentially distributed values (a long tail, like post-ReLU activations) and one outlier.
        let mut values: Vec<f32> = (0..10_000).map(|i| -((i as f32 + 0.5) / 10_000.0).ln()).collect();
        values[17] = 1000.0;
        let mut p = Observer::new(Calibrator::Percentile { percentile: 99.9 });
        let mut mm = Observer::new(Calibrator::MinMax);
        p.observe(&values).unwrap();
        mm.observe(&values).unwrap();
        let (_, hi) = p.range(U8).unwrap();
        let mut sorted = values.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(hi, sorted[(0.999f64 * 9999.0).round() as usize]);
        assert_eq!(mm.range(U8).unwrap().1, 1000.0);

        // Without the outlier, at 4 bits: MSE clips the tail and beats min-max on the values seen.
        values[17] = 1.0;
        const U4: QuantScheme = QuantScheme { bits: 4, symmetric: false, granularity: Granularity::PerTensor };
        let (mut m, mut mm) = (Observer::new(Calibrator::Mse), Observer::new(Calibrator::MinMax));
        m.observe(&values).unwrap();
        mm.observe(&values).unwrap();
        let err = |o: &Observer| quantization_mse(&values, o.params(U4).unwrap(), U4);
        assert!(m.range(U4).unwrap().1 < mm.range(U4).unwrap().1);
        assert!(err(&m) < 0.9 * err(&mm), "{} vs {}", err(&m), err(&mm));
    }

    #[test]
    fn kl_ignores_a_lone_outlier_and_keeps_a_plain_range() {
        // Uniform values on [0, 1): every candidate below 1 cuts real mass, so the threshold is
        // the maximum (the last candidate bin).
        let uniform: Vec<f32> = (0..20_000).map(|i| i as f32 / 20_000.0).collect();
        let t = kl_threshold(&uniform, 256);
        assert!((t - 1.0).abs() < 0.01, "{t}");
        // The same values and one outlier at 100: all the mass but one value sits in the first
        // 21 of 2048 bins, so the smallest candidate (256 bins: 100 · 256 / 2048 = 12.5) already
        // shows it without loss, and wins: the outlier is clipped, every real value kept.
        let mut outlier = uniform.clone();
        outlier[5] = 100.0;
        let t = kl_threshold(&outlier, 256);
        assert!((t - 12.5).abs() < 1e-3, "{t}");
        let mut o = Observer::new(Calibrator::Kl);
        o.observe(&outlier).unwrap();
        assert_eq!(o.range(U8), Some((0.0, t)));
        // Signed values use half the levels on each side: the smallest candidate is 128 bins.
        let signed: Vec<f32> = outlier.iter().enumerate().map(|(i, v)| if i % 2 == 0 { *v } else { -v }).collect();
        let mut o = Observer::new(Calibrator::Kl);
        o.observe(&signed).unwrap();
        let (lo, hi) = o.range(U8).unwrap();
        assert!((lo + 6.25).abs() < 1e-3 && hi < 1.0, "the outlier (at -100) is clipped: {lo} {hi}");
    }

    #[test]
    fn sample_stays_bounded_and_nan_is_refused() {
        let mut o = Observer::new(Calibrator::Percentile { percentile: 99.0 });
        let batch: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        for _ in 0..10 {
            o.observe(&batch).unwrap();
        }
        assert!(o.sample.len() <= SAMPLE_CAP);
        assert!(o.sample.len() > SAMPLE_CAP / 4);
        assert_eq!(o.observe(&[1.0, f32::NAN]), Err(1));
        assert_eq!(o.batches(), 10);
        assert!(Observer::new(Calibrator::MinMax).range(U8).is_none());
    }
}

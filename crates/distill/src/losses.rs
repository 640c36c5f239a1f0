//! Distillation losses as plain functions on burn tensors, usable in any training loop.

use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor};

/// Hinton's distillation loss:
/// `α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, labels)`, averaged over the batch.
///
/// The teacher's logits are detached, so gradients reach only the student. `α = 0` is plain
/// training on the labels; the T² factor keeps the soft term's gradients on the scale of the
/// hard term's as T changes.
///
/// # Panics
/// If the logits' shapes differ, or `temperature <= 0`.
pub fn kd_loss(
    student: Tensor<2>,
    teacher: Tensor<2>,
    labels: Tensor<1, Int>,
    temperature: f64,
    alpha: f64,
) -> Tensor<1> {
    // Softening keeps the shape, so `distillation_loss` checks both the shapes and the temperature.
    let soft = softmax(teacher.detach().div_scalar(temperature), 1);
    distillation_loss(student, soft, labels, temperature, alpha)
}

/// As [`kd_loss`], with the teacher given as probabilities already softened at the temperature
/// (one teacher's `softmax(t/T)`, or an ensemble's mean from [`soft_targets`]). The one
/// definition lives in shrink-core, because QAT with a teacher trains with it too.
pub use shrink_core::train::distillation_loss;

/// The soft targets of an ensemble: `Σᵢ wᵢ · softmax(tᵢ / T)` with the weights normalised to
/// sum to 1 (Hinton et al.'s mean of the teachers' softened outputs). One teacher with any
/// weight gives its own `softmax(t / T)`.
///
/// # Panics
/// If `teachers` is empty, the lengths differ, a weight is negative or not finite, or they sum
/// to 0.
pub fn soft_targets(teachers: &[Tensor<2>], weights: &[f64], temperature: f64) -> Tensor<2> {
    assert!(!teachers.is_empty(), "no teacher");
    assert_eq!(teachers.len(), weights.len(), "one weight per teacher");
    assert!(weights.iter().all(|w| w.is_finite() && *w >= 0.0), "weights must be finite and non-negative");
    let total: f64 = weights.iter().sum();
    assert!(total > 0.0, "the weights sum to 0");
    teachers
        .iter()
        .zip(weights)
        .map(|(t, w)| softmax(t.clone().detach().div_scalar(temperature), 1).mul_scalar(w / total))
        .reduce(|a, b| a + b)
        .expect("at least one teacher")
}

/// FitNets' hint loss: the mean squared difference between a (student) feature, already mapped
/// to the teacher's channels, and the teacher's feature, which is detached.
///
/// # Panics
/// If the shapes differ.
pub fn hint_loss(student: Tensor<4>, teacher: Tensor<4>) -> Tensor<1> {
    assert_eq!(student.dims(), teacher.dims(), "hint: student and teacher features differ in shape");
    (student - teacher.detach()).powi_scalar(2).mean()
}

/// Zagoruyko & Komodakis' spatial attention map of a feature map `[b, c, h, w]`: the mean over
/// channels of the squared activations, flattened to `[b, h·w]` and scaled to unit L2 norm.
pub fn attention_map(feature: Tensor<4>) -> Tensor<2> {
    let [b, _, h, w] = feature.dims();
    let q = feature.powi_scalar(2).mean_dim(1).reshape([b, h * w]);
    let norm = q.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    q / norm
}

/// Attention transfer: the mean squared difference between the student's and the teacher's
/// [`attention_map`]s (as in the authors' reference code; multiply by β, e.g. 1000). Channel
/// counts may differ; the spatial sizes must agree. The teacher is detached.
///
/// # Panics
/// If batch or spatial sizes differ.
pub fn attention_loss(student: Tensor<4>, teacher: Tensor<4>) -> Tensor<1> {
    let (s, t) = (student.dims(), teacher.dims());
    assert!(s[0] == t[0] && s[2] == t[2] && s[3] == t[3], "attention: batch or spatial sizes differ: {s:?} vs {t:?}");
    (attention_map(student) - attention_map(teacher.detach())).powi_scalar(2).mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> burn::tensor::Device {
        shrink_core::BackendKind::Flex.device().unwrap()
    }

    #[test]
    fn matches_hand_computed_value() {
        let device = device();
        let s = Tensor::<2>::from_floats([[0.0, 1.0]], &device);
        let t = Tensor::<2>::from_floats([[1.0, 0.0]], &device);
        let y = Tensor::<1, Int>::from_ints([0], &device);
        let got = kd_loss(s, t, y, 2.0, 0.5).into_scalar::<f32>() as f64;
        // At T = 2: teacher p = softmax([0.5, 0]), student q = softmax([0, 0.5]).
        let e = (0.5f64).exp();
        let p = [e / (e + 1.0), 1.0 / (e + 1.0)];
        let q = [p[1], p[0]];
        let kl = p[0] * (p[0] / q[0]).ln() + p[1] * (p[1] / q[1]).ln();
        let ce = (1.0f64 + 1.0f64.exp()).ln(); // -log softmax([0, 1])[0]
        let expected = 0.5 * 4.0 * kl + 0.5 * ce;
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn gradients_reach_only_the_student() {
        let device = device().autodiff();
        let s = Tensor::<2>::from_floats([[0.2, -0.3, 0.9]], &device).require_grad();
        let t = Tensor::<2>::from_floats([[1.0, 0.0, -1.0]], &device).require_grad();
        let y = Tensor::<1, Int>::from_ints([1], &device);
        let grads = kd_loss(s.clone(), t.clone(), y, 3.0, 0.7).backward();
        assert!(s.grad(&grads).is_some());
        assert!(t.grad(&grads).is_none());
    }

    #[test]
    fn t1_alpha0_is_plain_cross_entropy() {
        let device = device();
        let s = Tensor::<2>::from_floats([[0.3, -1.0, 2.0], [1.0, 1.5, -0.5]], &device);
        let t = Tensor::<2>::from_floats([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]], &device);
        let y = Tensor::<1, Int>::from_ints([2, 1], &device);
        let kd = kd_loss(s.clone(), t, y.clone(), 1.0, 0.0).into_scalar::<f32>();
        let ce = shrink_core::train::cross_entropy(s, y).into_scalar::<f32>();
        assert!((kd - ce).abs() < 1e-6, "{kd} vs {ce}");
    }

    #[test]
    fn identical_teachers_equal_one_teacher() {
        let device = device();
        let t = Tensor::<2>::from_floats([[0.5, -2.0, 1.0], [3.0, 0.1, 0.2]], &device);
        let one = soft_targets(std::slice::from_ref(&t), &[1.0], 4.0);
        let three = soft_targets(&[t.clone(), t.clone(), t], &[1.0, 2.0, 0.5], 4.0);
        let (a, b): (Vec<f32>, Vec<f32>) =
            (one.into_data().try_to_vec::<f32>().unwrap(), three.into_data().try_to_vec::<f32>().unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn ensemble_soft_targets_are_the_weighted_mean() {
        let device = device();
        let a = Tensor::<2>::from_floats([[0.0, 0.0]], &device); // softmax: [0.5, 0.5]
        let b = Tensor::<2>::from_floats([[2.0f32.ln(), 0.0]], &device); // at T = 1: [2/3, 1/3]
        let got: Vec<f32> = soft_targets(&[a, b], &[1.0, 3.0], 1.0).into_data().try_to_vec::<f32>().unwrap();
        let want = [0.25 * 0.5 + 0.75 * 2.0 / 3.0, 0.25 * 0.5 + 0.75 / 3.0];
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn hint_and_attention_match_hand_computed_values() {
        let device = device();
        // One image, two channels of 1×2.
        let s = Tensor::<4>::from_floats([[[[1.0, 0.0]], [[1.0, 0.0]]]], &device);
        let t = Tensor::<4>::from_floats([[[[0.0, 2.0]], [[1.0, 1.0]]]], &device);
        let hint = hint_loss(s.clone(), t.clone()).into_scalar::<f32>();
        assert!((hint - (1.0 + 4.0 + 0.0 + 1.0) / 4.0).abs() < 1e-6, "{hint}");
        // Student map: mean of squares over channels = [1, 0] → unit norm [1, 0].
        // Teacher map: [(0 + 1) / 2, (4 + 1) / 2] = [0.5, 2.5] → / sqrt(6.5).
        let n = 6.5f32.sqrt();
        let want = ((1.0 - 0.5 / n).powi(2) + (2.5 / n).powi(2)) / 2.0;
        let at = attention_loss(s, t).into_scalar::<f32>();
        assert!((at - want).abs() < 1e-6, "{at} vs {want}");
    }
}

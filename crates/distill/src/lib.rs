//! shrink-distill: knowledge distillation on burn tensors.
//!
//! This first slice holds Hinton et al.'s knowledge-distillation loss as a plain function on
//! burn tensors ([`kd_loss`]), usable in any training loop. Feature and attention losses,
//! ensembles of teachers and the `distill` stage build on it (see the project's issues).
//!
//! ```
//! use burn::tensor::{Int, Tensor};
//! use shrink_distill::kd_loss;
//! let device = shrink_core::BackendKind::Flex.device().unwrap();
//! let student = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
//! let teacher = student.clone();
//! let labels = Tensor::<1, Int>::from_ints([2], &device);
//! // A student equal to its teacher has no distillation term: only the hard-label loss remains.
//! let loss = kd_loss(student.clone(), teacher, labels.clone(), 4.0, 1.0).into_scalar::<f32>();
//! assert!(loss.abs() < 1e-6);
//! ```
#![warn(missing_docs)]

use burn::tensor::activation::{log_softmax, softmax};
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
    assert!(temperature > 0.0, "temperature must be positive");
    assert_eq!(student.dims(), teacher.dims(), "student and teacher logits differ in shape");
    let [batch, _] = student.dims();
    let teacher = teacher.detach();
    let p_t = softmax(teacher.clone().div_scalar(temperature), 1);
    let log_p_t = log_softmax(teacher.div_scalar(temperature), 1);
    let log_p_s = log_softmax(student.clone().div_scalar(temperature), 1);
    let kl = (p_t * (log_p_t - log_p_s)).sum().div_scalar(batch as f64);
    let hard = shrink_core::train::cross_entropy(student, labels);
    kl.mul_scalar(alpha * temperature * temperature) + hard.mul_scalar(1.0 - alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_value() {
        let device = shrink_core::BackendKind::Flex.device().unwrap();
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
        let device = shrink_core::BackendKind::Flex.device().unwrap().autodiff();
        let s = Tensor::<2>::from_floats([[0.2, -0.3, 0.9]], &device).require_grad();
        let t = Tensor::<2>::from_floats([[1.0, 0.0, -1.0]], &device).require_grad();
        let y = Tensor::<1, Int>::from_ints([1], &device);
        let grads = kd_loss(s.clone(), t.clone(), y, 3.0, 0.7).backward();
        assert!(s.grad(&grads).is_some());
        assert!(t.grad(&grads).is_none());
    }
}

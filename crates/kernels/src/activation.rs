//! The activations of mobile networks a layer's epilogue applies to its output (ReLU has its own
//! flag in every epilogue): the one definition of each, which the plan's separate steps and the
//! vector epilogues follow operation by operation.

/// An activation applied to each output value after the layer's epilogue (bias, rounding to a
/// grid, residual add).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `min(max(x, min), max)`, as ONNX Runtime computes it (ReLU6 is `min = 0, max = 6`; when
    /// `min > max` every value becomes `max`).
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `x · min(max(alpha · x + beta, 0), 1)`: hard-swish (`alpha = 1/6`, `beta = 1/2`: ONNX's
    /// `HardSwish`), or a `HardSigmoid` and the `Mul` of its input by it, as exporters wrote
    /// hard-swish before opset 14.
    HardSigmoidGate {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
}

impl Activation {
    /// Hard-swish: `x · min(max(x / 6 + 1/2, 0), 1)` (`x · (1/6)` rounds as `(1/6) · x` does).
    pub const HARD_SWISH: Activation = Activation::HardSigmoidGate { alpha: 1.0 / 6.0, beta: 0.5 };

    /// The activation of one value: the scalar definition. Each bound is a comparison that keeps
    /// `x` unless it is past the bound (so a NaN stays NaN, and −0 stays −0), which the vector
    /// paths compute as `max(bound, x)` and `min(bound, x)`.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Clip { min, max } => clip(x, min, max),
            Activation::HardSigmoidGate { alpha, beta } => hard_sigmoid_gate(x, alpha, beta),
        }
    }

    /// Its name in kernel labels: `clip` or `hard_sigmoid+mul`.
    pub fn label(self) -> &'static str {
        match self {
            Activation::Clip { .. } => "clip",
            Activation::HardSigmoidGate { .. } => "hard_sigmoid+mul",
        }
    }
}

/// An activation whose variant is a type, so that a vector loop generic over it carries no
/// choice (closures passed the same way were left out of line on the vector paths: measured).
/// [`Activation::dispatch`] picks the type of an [`Activation`].
pub trait Activate: Copy {
    /// [`Activation::apply`] of this variant.
    fn activate(self, x: f32) -> f32;
}

/// No activation.
#[derive(Clone, Copy, Debug)]
pub struct Identity;

/// [`Activation::Clip`] as a type.
#[derive(Clone, Copy, Debug)]
pub struct ClipTo(f32, f32);

/// [`Activation::HardSigmoidGate`] as a type.
#[derive(Clone, Copy, Debug)]
pub struct Gate(f32, f32);

impl Activate for Identity {
    #[inline(always)]
    fn activate(self, x: f32) -> f32 {
        x
    }
}

impl Activate for ClipTo {
    #[inline(always)]
    fn activate(self, x: f32) -> f32 {
        clip(x, self.0, self.1)
    }
}

impl Activate for Gate {
    #[inline(always)]
    fn activate(self, x: f32) -> f32 {
        hard_sigmoid_gate(x, self.0, self.1)
    }
}

/// What a loop generic over [`Activate`] computes: [`Activation::dispatch`] calls it with
/// the type of the activation.
pub trait WithActivation {
    /// The result.
    type Output;
    /// Runs with the activation `a`.
    fn run<A: Activate>(self, a: A) -> Self::Output;
}

impl Activation {
    /// `f.run(a)` with `a` the type of `activation` ([`Identity`] for `None`).
    #[inline(always)]
    pub fn dispatch<F: WithActivation>(activation: Option<Self>, f: F) -> F::Output {
        match activation {
            None => f.run(Identity),
            Some(Activation::Clip { min, max }) => f.run(ClipTo(min, max)),
            Some(Activation::HardSigmoidGate { alpha, beta }) => f.run(Gate(alpha, beta)),
        }
    }
}

/// [`Activation::Clip`].
#[inline(always)]
pub fn clip(x: f32, min: f32, max: f32) -> f32 {
    at_most(at_least(x, min), max)
}

/// [`Activation::HardSigmoidGate`].
#[inline(always)]
pub fn hard_sigmoid_gate(x: f32, alpha: f32, beta: f32) -> f32 {
    x * at_most(at_least(alpha * x + beta, 0.0), 1.0)
}

/// `x`, or `bound` where `x < bound`.
#[inline(always)]
fn at_least(x: f32, bound: f32) -> f32 {
    if x < bound { bound } else { x }
}

/// `x`, or `bound` where `x > bound`.
#[inline(always)]
fn at_most(x: f32, bound: f32) -> f32 {
    if x > bound { bound } else { x }
}

#[cfg(test)]
mod tests {
    use super::Activation;

    #[test]
    fn the_definitions_hold_at_their_edges() {
        let relu6 = Activation::Clip { min: 0.0, max: 6.0 };
        assert_eq!([-1.0, 0.0, 3.5, 6.0, 7.0].map(|x| relu6.apply(x)), [0.0, 0.0, 3.5, 6.0, 6.0]);
        assert!(relu6.apply(f32::NAN).is_nan());
        assert_eq!(relu6.apply(-0.0).to_bits(), (-0.0f32).to_bits());
        // min > max: everything becomes max, as ONNX Runtime computes it.
        let inverted = Activation::Clip { min: 2.0, max: 1.0 };
        assert_eq!([0.0, 1.5, 3.0].map(|x| inverted.apply(x)), [1.0, 1.0, 1.0]);
        let hs = Activation::HARD_SWISH;
        assert_eq!([-4.0, -3.0, 0.0, 3.0, 5.0].map(|x| hs.apply(x)), [-0.0, -0.0, 0.0, 3.0, 5.0]);
        assert_eq!(hs.apply(1.5), 1.5 * (1.5 / 6.0 + 0.5));
    }
}

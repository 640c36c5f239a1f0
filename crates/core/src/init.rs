//! Initial weights from a local, seeded generator: no backend's global generator is seeded or
//! read, so two models built at once (two tests, two threads) never draw from one stream, and a
//! model built from a seed has the same weights on every backend.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand_burn::SeedableRng;
use rand_burn::rngs::StdRng;

/// The generator initial weights are drawn from: rand's `StdRng` (ChaCha12; the version is
/// pinned by `Cargo.lock`), seeded from a `u64` as burn-flex seeds its own generator, and drawn
/// through burn's [`TensorData::random`], so a model built from seed `s` has exactly the weights
/// it had when shrink seeded burn-flex's global generator with `s`.
#[derive(Debug)]
pub struct InitRng(StdRng);

impl InitRng {
    /// A generator seeded with `seed`.
    pub fn seeded(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// A tensor of `shape` drawn from `distribution` on the host, then placed on `device`.
    pub fn tensor<const D: usize>(
        &mut self,
        shape: [usize; D],
        distribution: Distribution,
        device: &Device,
    ) -> Tensor<D> {
        Tensor::from_data(TensorData::random::<f32, _, _>(shape, distribution, &mut self.0), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_values_and_another_does_not() {
        let device = crate::BackendKind::Flex.device().unwrap();
        let draw = |seed| {
            let mut rng = InitRng::seeded(seed);
            let a = crate::host::floats(rng.tensor([4, 3], Distribution::Normal(0.0, 1.0), &device)).unwrap();
            let b = crate::host::floats(rng.tensor([5], Distribution::Uniform(-1.0, 1.0), &device)).unwrap();
            (a, b)
        };
        let (a, b) = draw(7);
        assert_eq!((a.clone(), b.clone()), draw(7));
        assert_ne!(a, draw(8).0);
        // Successive draws continue the stream instead of restarting it.
        assert_ne!(&a[..5], &b[..]);
        assert!(b.iter().all(|v| (-1.0..1.0).contains(v)));
    }

    /// The stream is the one burn-flex's global generator gives after `seed(s)`, so models built
    /// from a seed keep the initial weights (and cached baselines, reports) they had before.
    #[test]
    fn draws_what_burn_flex_draws_after_seeding() {
        let device = crate::BackendKind::Flex.device().unwrap();
        device.seed(11);
        let global = crate::host::floats(Tensor::<2>::random([6, 5], Distribution::Normal(0.0, 0.5), &device)).unwrap();
        let local =
            crate::host::floats(InitRng::seeded(11).tensor([6, 5], Distribution::Normal(0.0, 0.5), &device)).unwrap();
        assert_eq!(global, local);
    }
}

//! Which rank owns which parameter under ZeRO: parameters in the model's (fixed) order are cut
//! into W contiguous runs of about equal size, as PyTorch's ZeroRedundancyOptimizer and
//! DeepSpeed partition them (whole parameters, so a run is at most one parameter over 1/W).

/// The owner of every parameter, in the order the sizes were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    owners: Vec<usize>,
    world: usize,
}

impl Partition {
    /// Contiguous runs: parameter i goes to the rank whose share of the total holds the middle
    /// of parameter i, so each rank's run ends within half a parameter of its 1/W boundary.
    pub fn contiguous(sizes: &[usize], world: usize) -> Self {
        let total: usize = sizes.iter().sum::<usize>().max(1);
        let mut start = 0usize;
        let owners = sizes
            .iter()
            .map(|&n| {
                let middle = 2 * start + n;
                start += n;
                ((middle as u128 * world as u128) / (2 * total as u128)).min(world as u128 - 1) as usize
            })
            .collect();
        Self { owners, world }
    }

    pub fn owner(&self, index: usize) -> usize {
        self.owners[index]
    }

    /// Elements each rank owns.
    pub fn shares(&self, sizes: &[usize]) -> Vec<usize> {
        let mut shares = vec![0; self.world];
        for (&owner, &n) in self.owners.iter().zip(sizes) {
            shares[owner] += n;
        }
        shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_balanced_and_cover_every_rank() {
        let sizes = [4096, 64, 4096, 4096, 64, 4096, 4096, 64, 4096, 8192];
        for world in 1..=4 {
            let p = Partition::contiguous(&sizes, world);
            let owners: Vec<usize> = (0..sizes.len()).map(|i| p.owner(i)).collect();
            assert!(owners.windows(2).all(|w| w[0] <= w[1]), "{owners:?}");
            let shares = p.shares(&sizes);
            let total: usize = sizes.iter().sum();
            let largest = *sizes.iter().max().unwrap();
            for share in &shares {
                assert!(share.abs_diff(total / world) <= largest, "world {world}: {shares:?}");
            }
            assert_eq!(shares.iter().sum::<usize>(), total);
        }
        assert_eq!(Partition::contiguous(&[10, 10], 2).shares(&[10, 10]), vec![10, 10]);
    }
}

//! Reductions across the units of a cube: the sum, max or min of one value per unit, over the
//! whole cube or over each group of consecutive units, every unit of a group getting the result.
//!
//! Through plane (warp) operations where the device has them (CUDA: 32-wide planes), else
//! through a shared-memory tree. cubecl's wgpu runtime reports no plane operations on a
//! CPU-emulated device (Mesa's lavapipe), so the kernels run the tree in CI and the planes on
//! the GPU; `kernels/tests/reduce.rs` checks both paths on both.

use cubecl::features::Plane;
use cubecl::prelude::*;

/// What a reduction computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// How a kernel's units reduce: fixed when the kernel is compiled (a comptime argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reduction {
    /// Units in the cube (`CUBE_DIM`), a multiple of `group`.
    pub units: usize,
    /// Units per group: each run of `group` consecutive units (by `UNIT_POS`) reduces on its
    /// own. A power of two that divides `units`; `units` for the whole cube.
    pub group: usize,
    /// The plane width when plane operations are used, 0 for the shared-memory tree.
    pub plane: usize,
}

impl Reduction {
    /// Groups of `group` units in a cube of `units`, with plane operations where `client`'s
    /// device has them.
    pub fn new<R: Runtime>(client: &ComputeClient<R>, units: usize, group: usize) -> Self {
        Self::with_plane(units, group, plane_width(client).unwrap_or(0))
    }

    /// The whole cube of `units` as one group.
    pub fn cube<R: Runtime>(client: &ComputeClient<R>, units: usize) -> Self {
        Self::new(client, units, units)
    }

    /// As [`Reduction::new`] with the path chosen by the caller: `plane` 0 for the
    /// shared-memory tree (any device), else the device's plane width.
    pub fn with_plane(units: usize, group: usize, plane: usize) -> Self {
        assert!(
            group.is_power_of_two() && units.is_multiple_of(group),
            "reduction over groups of {group} in a cube of {units}: the group must be a power \
             of two that divides the cube"
        );
        assert!(
            plane == 0 || plane.is_power_of_two(),
            "plane width {plane} is not a power of two"
        );
        Self {
            units,
            group,
            // Plane operations read every lane: the cube must be whole planes.
            plane: if plane > 0 && units.is_multiple_of(plane) {
                plane
            } else {
                0
            },
        }
    }
}

/// The device's plane width when its plane operations can be used here: supported, and one
/// fixed width (a device whose planes vary in width, as some Vulkan devices allow, gets the
/// tree).
pub fn plane_width<R: Runtime>(client: &ComputeClient<R>) -> Option<usize> {
    let hw = &client.properties().hardware;
    let width = hw.plane_size_max as usize;
    (client.features().plane.contains(Plane::Ops)
        && hw.plane_size_min == hw.plane_size_max
        && width.is_power_of_two())
    .then_some(width)
}

/// `value` of every unit of this unit's group, combined by `op`, for every unit. Every unit of
/// the cube must call it, in uniform control flow. It returns after a cube barrier, so
/// shared-memory writes made before the call are visible to every unit after it, and a call in
/// a loop cannot overwrite values the previous round still reads.
#[cube]
pub fn reduce<N: Numeric>(value: N, #[comptime] op: ReduceOp, #[comptime] how: Reduction) -> N {
    let result = if comptime!(how.plane > 0) {
        reduce_planes::<N>(value, op, how)
    } else {
        reduce_tree::<N>(value, op, how)
    };
    sync_cube();
    result
}

/// As [`reduce()`], but where `how` uses plane operations and each group lies within one plane
/// (butterfly shuffles, no shared memory) it returns without [`reduce()`]'s closing cube barrier:
/// for reductions in a hot loop whose caller needs none. Elsewhere it is [`reduce()`], barrier
/// included (the shared-memory tree needs it between rounds).
#[cube]
pub fn reduce_in_plane<N: Numeric>(
    value: N,
    #[comptime] op: ReduceOp,
    #[comptime] how: Reduction,
) -> N {
    if comptime!(how.plane > 0 && how.group <= how.plane) {
        reduce_planes::<N>(value, op, how)
    } else {
        reduce::<N>(value, op, how)
    }
}

/// The sum over the group.
#[cube]
pub fn reduce_sum<N: Numeric>(value: N, #[comptime] how: Reduction) -> N {
    reduce::<N>(value, ReduceOp::Sum, how)
}

/// The largest value over the group.
#[cube]
pub fn reduce_max<N: Numeric>(value: N, #[comptime] how: Reduction) -> N {
    reduce::<N>(value, ReduceOp::Max, how)
}

/// The smallest value over the group.
#[cube]
pub fn reduce_min<N: Numeric>(value: N, #[comptime] how: Reduction) -> N {
    reduce::<N>(value, ReduceOp::Min, how)
}

#[cube]
fn combine<N: Numeric>(a: N, b: N, #[comptime] op: ReduceOp) -> N {
    if comptime!(op == ReduceOp::Sum) {
        a + b
    } else if comptime!(op == ReduceOp::Max) {
        max(a, b)
    } else {
        min(a, b)
    }
}

/// The value that leaves any other unchanged under `op`.
#[cube]
fn identity<N: Numeric>(#[comptime] op: ReduceOp) -> N {
    if comptime!(op == ReduceOp::Sum) {
        N::from_int(0)
    } else if comptime!(op == ReduceOp::Max) {
        N::min_value()
    } else {
        N::max_value()
    }
}

#[cube]
fn plane_reduce<N: Numeric>(value: N, #[comptime] op: ReduceOp) -> N {
    if comptime!(op == ReduceOp::Sum) {
        plane_sum(value)
    } else if comptime!(op == ReduceOp::Max) {
        plane_max(value)
    } else {
        plane_min(value)
    }
}

/// Shared-memory tree: each step halves the units still adding; the last pair is combined by
/// every unit as it reads the result, so a group of 2^s units synchronises s times, plus
/// [`reduce`]'s closing barrier (a tree down to one slot needs s + 1 before its read).
#[cube]
fn reduce_tree<N: Numeric>(value: N, #[comptime] op: ReduceOp, #[comptime] how: Reduction) -> N {
    let mut result = value;
    if comptime!(how.group > 1) {
        let unit = UNIT_POS as usize;
        let lane = unit % how.group;
        let first = unit - lane;
        let mut slots = SharedMemory::<N>::new(how.units);
        slots[unit] = value;
        sync_cube();
        let mut stride = comptime!(how.group / 2).runtime();
        while stride > 1 {
            if lane < stride {
                slots[unit] = combine::<N>(slots[unit], slots[unit + stride], op);
            }
            sync_cube();
            stride /= 2;
        }
        result = combine::<N>(slots[first], slots[first + 1], op);
    }
    result
}

/// Plane operations: a group within one plane combines by butterfly shuffles (or one plane
/// reduction when it is the whole plane); a group of several planes combines each plane's
/// result through shared memory.
#[cube]
fn reduce_planes<N: Numeric>(value: N, #[comptime] op: ReduceOp, #[comptime] how: Reduction) -> N {
    let mut result = value;
    if comptime!(how.group == how.plane) {
        result = plane_reduce::<N>(value, op);
    } else if comptime!(how.group < how.plane) {
        let mut mask = comptime!((how.group / 2) as u32).runtime();
        while mask > 0 {
            result = combine::<N>(result, plane_shuffle_xor(result, mask), op);
            mask /= 2;
        }
    } else {
        let planes_per_group = comptime!(how.group / how.plane);
        let unit = UNIT_POS as usize;
        let lane = unit % how.plane;
        let plane_idx = unit / how.plane;
        let mut partials = SharedMemory::<N>::new(comptime!(how.units / how.plane));
        let own = plane_reduce::<N>(value, op);
        if lane == 0 {
            partials[plane_idx] = own;
        }
        sync_cube();
        let first = plane_idx - plane_idx % planes_per_group;
        let mut acc = identity::<N>(op);
        let mut i = lane;
        while i < planes_per_group {
            acc = combine::<N>(acc, partials[first + i], op);
            i += how.plane;
        }
        result = plane_reduce::<N>(acc, op);
    }
    result
}

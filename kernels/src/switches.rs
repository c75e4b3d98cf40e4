//! The speed switches: environment variables that choose between kernel paths, so that one
//! binary gives a before/after pair in one run. Read once per process, all in one place, and
//! checked: a value that is not understood is an error, never silently the default.
//!
//! | variable | effect | default |
//! |---|---|---|
//! | `CUBEQWEN_NO_GRAPHS` | decode through cubecl launches, no CUDA graph | graphs on CUDA |
//! | `CUBEQWEN_NO_PDL` | graph kernels strictly one after another | programmatic dependent launch (sm_90+) |
//! | `CUBEQWEN_NO_ASYNC_COPY` | the decode GEMVs read their weights after the wait | `cp.async` prefetch (CUDA, sm_80+) |
//! | `CUBEQWEN_NO_FLASH` | the chunked attention kernel for prompts | the flash kernel |
//! | `CUBEQWEN_NO_FUSED_GEMV` | a short chunk's q/k/v and gate/up + SwiGLU as separate launches | fused ([`crate::fused_gemv`]) where `Auto` gives their weights to the GEMV |
//! | `CUBEQWEN_NO_GEMV_MMA` | `Auto` never takes the tensor-core GEMV (2 to 32 rows: the scalar GEMV or cubek) | tensor cores where the device has `mma.m16n8k16` |
//! | `CUBEQWEN_FFN_STAGES` | `N` (0 to 4): row pairs in flight a plane in the decode step's `ffn_in` ([`crate::decode::ffn_in`]); 0: the one-shot kernel (every row of a cube staged, one wait) | [`crate::decode::FFN_STAGES`] |
//! | `CUBEQWEN_GEMV_STAGES` | `N` (0 to 4): rows in flight a plane group in the decode step's GEMV + residual (o, down) where its one-shot grid would take more than one wave ([`crate::decode::gemv_residual`]); 0: the one-shot kernel always | [`crate::decode::GEMV_STAGES`] |
//! | `CUBEQWEN_ATTN_IN_STAGES` | `N` (0 to 4): pair-rows in flight a plane group in the decode step's `attn_in` where its one-shot grid would take more than one wave ([`crate::decode::attn_in`]); 0: the one-shot kernel always | [`crate::decode::ATTN_IN_STAGES`] |
//! | `CUBEQWEN_FLASH_KERNEL` | `auto`, `portable`, `mma`, `mma-emulated` | `auto` |
//! | `CUBEQWEN_FLASH_EXACT_EXP` | the mma flash kernels' exponentials through `expf` | `__expf` (`ex2.approx`; [`crate::flash`]) |
//! | `CUBEQWEN_FLASH_SPLITS` | `N` (1 to 64): the mma flash kernels split the keys over N cubes a row tile (1: no split) | by grid and device ([`crate::flash::flash_splits`]) |
//! | `CUBEQWEN_TIMELINE` | graph kernels stamp a timeline ([`crate::graph`]) | off |
//! | `CUBEQWEN_GRAPH_CHECKED` | graph kernels compiled with cubecl's bounds checks | unchecked |
//! | `CUBEQWEN_GEMV_SHAPE` | `AxB`: A threads an output (a power of two), B outputs a cube | by device, rows and k |
//! | `CUBEQWEN_MMA_TILE` | `BMxBNxBK[xS[xPN]]`: the tile of the mma matmul, its stages (2 or 3) and a plane's columns (32 or 64; [`crate::matmul_mma::MmaTile`]; BM a multiple of 64, BN of PN, BK of 32) | by shape and device ([`crate::matmul_mma::tile_for`]) |
//! | `CUBEQWEN_CUBEK_STRATEGY` | cubek's matmul algorithm ([`crate::matmul`]) | by device |
//! | `CUBEQWEN_CUBEK_TILING` | `tiles=T,rows=R,pk=K,buf=single\|double` or `pm=,pn=,sm=,sn=,pk=,buf=` (any of them; [`CubekTiling`]), or `cubek` (cubek's own choice): the tiling of cubek's TMA kernel | [`crate::matmul::TMA_TILING`] |
//!
//! The on/off switches take `1`, `true`, `yes`, `on` (set) or `0`, `false`, `no`, `off`, empty
//! (not set).

use std::sync::OnceLock;

use anyhow::{bail, Result};

use crate::flash::PrefillKernel;
use crate::matmul_mma::MmaTile;

/// The switches as this process reads them (see the module's table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switches {
    pub no_graphs: bool,
    pub no_pdl: bool,
    pub no_async_copy: bool,
    pub no_flash: bool,
    pub no_fused_gemv: bool,
    pub no_gemv_mma: bool,
    pub flash_kernel: PrefillKernel,
    /// The mma flash kernels' exponentials exact (`expf`) rather than fast (`__expf`).
    pub flash_exact_exp: bool,
    /// Key splits of the mma flash kernels.
    pub flash_splits: Option<usize>,
    /// Row pairs in flight a plane in the decode `ffn_in` (0: the one-shot kernel).
    pub ffn_stages: Option<usize>,
    /// Rows in flight a plane group in the decode step's streamed GEMV + residual.
    pub gemv_stages: Option<usize>,
    /// Pair-rows in flight a plane group in the decode step's streamed `attn_in`.
    pub attn_in_stages: Option<usize>,
    pub timeline: bool,
    pub graph_checked: bool,
    /// (threads an output, outputs a cube).
    pub gemv_shape: Option<(usize, usize)>,
    /// A name [`crate::matmul`] knows (checked when read).
    pub cubek_strategy: Option<String>,
    /// Overrides of the TMA kernel's tiling.
    pub cubek_tiling: Option<CubekTiling>,
    /// The mma matmul's tile (checked at launch).
    pub mma_tile: Option<MmaTile>,
}

/// The tiling of cubek's warp-specialized TMA matmul, as cubek's selector takes it; `None`
/// leaves a field to the selector (all `None`: cubek's own blueprint, the value `cubek`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CubekTiling {
    /// 16×16 tiles along m and along n of a stage (cubek's `row_count`).
    pub tiles: Option<u32>,
    /// Rows of tiles a plane computes (so `tiles / rows` compute planes).
    pub rows: Option<u32>,
    /// 16-deep tiles along k in a stage (`partition_k`; at most 4 for f16).
    pub pk: Option<u32>,
    /// Partition buffering: single (`true`) or double.
    pub single_buffer: Option<bool>,
    /// An explicit stage instead of cubek's selector (`tiles`, `rows` then unused): each plane
    /// computes `pm × pn` tiles, `sm × sn` planes a stage (so a stage is `16·pm·sm` rows by
    /// `16·pn·sn` columns); `None` unless one of the four is given (the others then default to
    /// 1, 8, 8, 1).
    pub partition: Option<[u32; 4]>,
}

impl std::str::FromStr for CubekTiling {
    type Err = anyhow::Error;
    fn from_str(v: &str) -> Result<Self> {
        let mut t = CubekTiling::default();
        if v.trim() == "cubek" {
            return Ok(t); // every field cubek's choice
        }
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, val) = part
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("`{part}`: expected name=value"))?;
            let num = || -> Result<u32> {
                match val.trim().parse::<u32>() {
                    Ok(n) if (1..=32).contains(&n) => Ok(n),
                    _ => bail!("`{part}`: expected a number from 1 to 32"),
                }
            };
            match k.trim() {
                "tiles" => t.tiles = Some(num()?),
                "rows" => t.rows = Some(num()?),
                "pk" => t.pk = Some(num()?),
                "pm" | "pn" | "sm" | "sn" => {
                    let i = ["pm", "pn", "sm", "sn"].iter().position(|n| *n == k.trim());
                    t.partition.get_or_insert([1, 8, 8, 1])[i.unwrap_or(0)] = num()?;
                }
                "buf" => {
                    t.single_buffer = Some(match val.trim() {
                        "single" => true,
                        "double" => false,
                        _ => bail!("`{part}`: expected buf=single or buf=double"),
                    })
                }
                other => bail!("`{other}`: expected tiles, rows, pk, buf, pm, pn, sm or sn"),
            }
        }
        if t.partition.is_some() && (t.tiles.is_some() || t.rows.is_some()) {
            bail!(
                "`{v}`: tiles and rows are the selector's, pm/pn/sm/sn an explicit stage: not both"
            );
        }
        Ok(t)
    }
}

/// The process's switches, read from the environment on the first call.
pub fn switches() -> Result<&'static Switches> {
    static SWITCHES: OnceLock<std::result::Result<Switches, String>> = OnceLock::new();
    SWITCHES
        .get_or_init(|| Switches::parse(|k| std::env::var(k).ok()).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

impl Switches {
    /// The switches from `get` (a variable's value, `None` where it is not set).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let flag = |k: &str| -> Result<bool> {
            Ok(match get(k).as_deref().map(str::trim) {
                None | Some("" | "0" | "false" | "no" | "off") => false,
                Some("1" | "true" | "yes" | "on") => true,
                Some(v) => bail!("{k}={v}: expected 1/true/yes/on or 0/false/no/off"),
            })
        };
        let flash_kernel = match get("CUBEQWEN_FLASH_KERNEL") {
            Some(k) => k
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("CUBEQWEN_FLASH_KERNEL: {e:#}"))?,
            None => PrefillKernel::Auto,
        };
        // A count in `min..=max`; unset or empty: the default.
        let number = |name: &str, min: usize, max: usize| -> Result<Option<usize>> {
            match get(name) {
                Some(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
                    Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                    _ => bail!("{name}={v}: expected a number from {min} to {max}"),
                },
                _ => Ok(None),
            }
        };
        let flash_splits = number("CUBEQWEN_FLASH_SPLITS", 1, crate::flash::MAX_SPLITS)?;
        let ffn_stages = number("CUBEQWEN_FFN_STAGES", 0, crate::decode::MAX_FFN_STAGES)?;
        let gemv_stages = number("CUBEQWEN_GEMV_STAGES", 0, crate::decode::MAX_GEMV_STAGES)?;
        let attn_in_stages = number("CUBEQWEN_ATTN_IN_STAGES", 0, crate::decode::MAX_GEMV_STAGES)?;
        let gemv_shape = match get("CUBEQWEN_GEMV_SHAPE") {
            Some(v) => Some(parse_gemv_shape(v.trim()).ok_or_else(|| {
                anyhow::anyhow!(
                    "CUBEQWEN_GEMV_SHAPE={v}: expected AxB, A threads an output (a power of \
                     two), B ≥ 1 outputs a cube, A·B ≤ 1024"
                )
            })?),
            None => None,
        };
        let cubek_strategy = match get("CUBEQWEN_CUBEK_STRATEGY") {
            Some(v) if !v.trim().is_empty() => {
                crate::matmul::cubek_strategy_named(v.trim())?;
                Some(v.trim().to_string())
            }
            _ => None,
        };
        let cubek_tiling = match get("CUBEQWEN_CUBEK_TILING") {
            Some(v) if !v.trim().is_empty() => Some(
                v.parse::<CubekTiling>()
                    .map_err(|e| anyhow::anyhow!("CUBEQWEN_CUBEK_TILING={v}: {e:#}"))?,
            ),
            _ => None,
        };
        let mma_tile = match get("CUBEQWEN_MMA_TILE") {
            Some(v) if !v.trim().is_empty() => Some(
                v.parse::<MmaTile>()
                    .map_err(|e| anyhow::anyhow!("CUBEQWEN_MMA_TILE={v}: {e:#}"))?,
            ),
            _ => None,
        };
        Ok(Self {
            no_graphs: flag("CUBEQWEN_NO_GRAPHS")?,
            no_pdl: flag("CUBEQWEN_NO_PDL")?,
            no_async_copy: flag("CUBEQWEN_NO_ASYNC_COPY")?,
            no_flash: flag("CUBEQWEN_NO_FLASH")?,
            no_fused_gemv: flag("CUBEQWEN_NO_FUSED_GEMV")?,
            no_gemv_mma: flag("CUBEQWEN_NO_GEMV_MMA")?,
            flash_kernel,
            flash_exact_exp: flag("CUBEQWEN_FLASH_EXACT_EXP")?,
            flash_splits,
            ffn_stages,
            gemv_stages,
            attn_in_stages,
            timeline: flag("CUBEQWEN_TIMELINE")?,
            graph_checked: flag("CUBEQWEN_GRAPH_CHECKED")?,
            gemv_shape,
            cubek_strategy,
            cubek_tiling,
            mma_tile,
        })
    }
}

fn parse_gemv_shape(v: &str) -> Option<(usize, usize)> {
    let (a, b) = v.split_once('x')?;
    let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
    (a.is_power_of_two() && b > 0 && a.checked_mul(b)? <= 1024).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Switches> {
        Switches::parse(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn unset_is_every_default() {
        let s = parse(&[]).unwrap();
        assert!(!s.no_graphs && !s.no_pdl && !s.no_async_copy && !s.no_flash && !s.timeline);
        assert!(!s.graph_checked && !s.no_fused_gemv && !s.no_gemv_mma && !s.flash_exact_exp);
        assert_eq!(s.flash_kernel, PrefillKernel::Auto);
        assert_eq!((s.gemv_shape, s.cubek_strategy), (None, None));
        assert_eq!((s.cubek_tiling, s.flash_splits), (None, None));
        assert_eq!(s.mma_tile, None);
        assert_eq!(
            (s.ffn_stages, s.gemv_stages, s.attn_in_stages),
            (None, None, None)
        );
    }

    #[test]
    fn flags_read_both_ways() {
        let on = parse(&[
            ("CUBEQWEN_NO_GRAPHS", "1"),
            ("CUBEQWEN_TIMELINE", "yes"),
            ("CUBEQWEN_NO_FUSED_GEMV", "on"),
        ])
        .unwrap();
        assert!(on.no_graphs && on.timeline && on.no_fused_gemv && !on.no_pdl);
        let off = parse(&[("CUBEQWEN_NO_GRAPHS", "0"), ("CUBEQWEN_NO_PDL", "")]).unwrap();
        assert!(!off.no_graphs && !off.no_pdl);
    }

    #[test]
    fn values_are_parsed() {
        let s = parse(&[
            ("CUBEQWEN_GEMV_SHAPE", "16x4"),
            ("CUBEQWEN_FLASH_KERNEL", "portable"),
            ("CUBEQWEN_CUBEK_STRATEGY", "simple_cyclic_cmma"),
            ("CUBEQWEN_CUBEK_TILING", "tiles=4, pk=4,buf=single"),
            ("CUBEQWEN_FLASH_SPLITS", "8"),
            ("CUBEQWEN_FFN_STAGES", "0"),
            ("CUBEQWEN_GEMV_STAGES", "3"),
            ("CUBEQWEN_ATTN_IN_STAGES", "1"),
            ("CUBEQWEN_MMA_TILE", "128x64x32x3"),
        ])
        .unwrap();
        let tile = s.mma_tile.unwrap();
        assert_eq!((tile.bm, tile.bn, tile.bk, tile.stages), (128, 64, 32, 3));
        let two = parse(&[("CUBEQWEN_MMA_TILE", "64x128x64")]).unwrap();
        assert_eq!(two.mma_tile.map(|t| (t.stages, t.pn)), Some((2, 32)));
        let wide = parse(&[("CUBEQWEN_MMA_TILE", "128x128x64x3x64")]).unwrap();
        assert_eq!(wide.mma_tile.map(|t| (t.stages, t.pn)), Some((3, 64)));
        assert_eq!(
            "cubek".parse::<CubekTiling>().unwrap(),
            CubekTiling::default()
        );
        let t = s.cubek_tiling.unwrap();
        assert_eq!(
            (t.tiles, t.rows, t.pk, t.single_buffer),
            (Some(4), None, Some(4), Some(true))
        );
        assert_eq!(s.gemv_shape, Some((16, 4)));
        assert_eq!(s.flash_splits, Some(8));
        assert_eq!(
            (s.ffn_stages, s.gemv_stages, s.attn_in_stages),
            (Some(0), Some(3), Some(1))
        );
        assert_eq!(s.flash_kernel, PrefillKernel::Portable);
        assert_eq!(s.cubek_strategy.as_deref(), Some("simple_cyclic_cmma"));
    }

    #[test]
    fn bad_values_are_errors_that_name_the_variable() {
        for (k, v) in [
            ("CUBEQWEN_NO_GRAPHS", "maybe"),
            ("CUBEQWEN_GEMV_SHAPE", "12x4"),
            ("CUBEQWEN_GEMV_SHAPE", "32x64"),
            ("CUBEQWEN_GEMV_SHAPE", "32"),
            ("CUBEQWEN_GEMV_SHAPE", "32x0"),
            ("CUBEQWEN_FLASH_KERNEL", "fast"),
            ("CUBEQWEN_CUBEK_STRATEGY", "quick"),
            ("CUBEQWEN_CUBEK_TILING", "tiles=0"),
            ("CUBEQWEN_CUBEK_TILING", "pk"),
            ("CUBEQWEN_CUBEK_TILING", "buf=triple"),
            ("CUBEQWEN_CUBEK_TILING", "cols=2"),
            ("CUBEQWEN_CUBEK_TILING", "tiles=8,pn=4"),
            ("CUBEQWEN_FLASH_SPLITS", "0"),
            ("CUBEQWEN_FLASH_SPLITS", "65"),
            ("CUBEQWEN_FFN_STAGES", "5"),
            ("CUBEQWEN_FFN_STAGES", "two"),
            ("CUBEQWEN_GEMV_STAGES", "5"),
            ("CUBEQWEN_GEMV_STAGES", "-1"),
            ("CUBEQWEN_ATTN_IN_STAGES", "5"),
            ("CUBEQWEN_MMA_TILE", "128x64"),
            ("CUBEQWEN_MMA_TILE", "128x64x8"),
            ("CUBEQWEN_MMA_TILE", "128xx64"),
            ("CUBEQWEN_MMA_TILE", "128x64x64x4"),
            ("CUBEQWEN_MMA_TILE", "128x64x64x3x48"),
            ("CUBEQWEN_MMA_TILE", "128x64x64x3x64x2"),
        ] {
            let e = format!("{:#}", parse(&[(k, v)]).unwrap_err());
            assert!(e.contains(k), "{k}={v}: {e}");
        }
    }
}

//! Flags that several subcommands share, declared once: a parallel layout's degrees, and the
//! overrides `marathon train` (and the workers and agents it starts) apply to a configuration.

use anyhow::Result;
use clap::Args;
use marathon_model::ParallelLayout;
use marathon_runtime::config::Resume;
use marathon_runtime::TrainConfig;

/// A parallel layout's degrees. Each is optional here; a subcommand either lets an absent one
/// keep its configuration's value (`train`) or gives it a default of its own (through clap's
/// `mut_arg`, so `--help` shows it).
#[derive(Debug, Clone, Default, Args)]
pub struct LayoutFlags {
    /// Tensor-parallel size (it must divide the heads).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Pipeline-parallel stages (they must divide the layers).
    #[arg(long)]
    pub pp: Option<usize>,
    /// Data-parallel replicas.
    #[arg(long)]
    pub dp: Option<usize>,
}

impl LayoutFlags {
    /// `base` with the degrees given here in place of its own.
    pub fn over(&self, base: ParallelLayout) -> ParallelLayout {
        ParallelLayout {
            tp: self.tp.unwrap_or(base.tp),
            pp: self.pp.unwrap_or(base.pp),
            dp: self.dp.unwrap_or(base.dp),
            ..base
        }
    }

    /// The degrees given here, each 1 when absent.
    pub fn layout(&self) -> ParallelLayout {
        self.over(ParallelLayout::default())
    }

    /// The flags as arguments, for a process this one starts.
    pub fn args(&self) -> Vec<String> {
        [("--tp", self.tp), ("--pp", self.pp), ("--dp", self.dp)]
            .into_iter()
            .filter_map(|(flag, v)| v.map(|v| [flag.to_string(), v.to_string()]))
            .flatten()
            .collect()
    }
}

/// What `marathon train` overrides in a configuration: its layout, how it resumes, and its
/// device. Workers and agents a launch starts are given the same flags.
#[derive(Debug, Clone, Default, Args)]
pub struct TrainFlags {
    #[command(flatten)]
    pub layout: LayoutFlags,
    /// Continue from the newest committed checkpoint under checkpoint.root (`auto`, the
    /// default), or refuse a root that has one (`never`).
    #[arg(long, value_parser = ["auto", "never"])]
    resume: Option<String>,
    /// Where the model computes: `cpu`, or `cuda` for one GPU (sets train.device).
    #[arg(long, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
}

impl TrainFlags {
    /// Applies the flags to `cfg` and validates the result.
    pub fn apply(&self, cfg: &mut TrainConfig) -> Result<()> {
        cfg.parallel = self.layout.over(cfg.parallel);
        if let Some(r) = &self.resume {
            let Some(c) = cfg.checkpoint.as_mut() else {
                anyhow::bail!(
                    "--resume {r}: {} has no [checkpoint] section to resume from; add one with a root",
                    cfg.source.display()
                );
            };
            c.resume = if r == "never" {
                Resume::Never
            } else {
                Resume::Auto
            };
        }
        if let Some(d) = &self.device {
            cfg.train.device = d.parse().map_err(anyhow::Error::msg)?;
        }
        cfg.validate().map_err(|e| cfg.error(e))?;
        Ok(())
    }

    /// The flags as arguments, for a worker or agent this process starts.
    pub fn args(&self) -> Vec<String> {
        let mut out = self.layout.args();
        if let Some(r) = &self.resume {
            out.extend(["--resume".to_string(), r.clone()]);
        }
        if let Some(d) = &self.device {
            out.extend(["--device".to_string(), d.clone()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(mut_arg("tp", |a| a.default_value("2")))]
    struct WithDefault {
        #[command(flatten)]
        layout: LayoutFlags,
    }

    #[test]
    fn absent_degrees_keep_the_base_and_a_subcommands_default_fills_them() {
        let base = ParallelLayout {
            tp: 4,
            pp: 3,
            dp: 2,
            distributed_optimizer: true,
        };
        let flags = LayoutFlags {
            tp: None,
            pp: Some(5),
            dp: None,
        };
        let got = flags.over(base);
        assert_eq!((got.tp, got.pp, got.dp), (4, 5, 2));
        assert!(got.distributed_optimizer);
        assert_eq!(flags.args(), ["--pp", "5"]);
        let parsed = WithDefault::parse_from(["x", "--dp", "3"]).layout;
        assert_eq!(
            parsed.layout(),
            ParallelLayout {
                tp: 2,
                pp: 1,
                dp: 3,
                ..Default::default()
            }
        );
        assert_eq!(parsed.args(), ["--tp", "2", "--dp", "3"]);
    }
}

//! `patchctl agent`: not implemented yet (placeholder so the CLI compiles while the command is built).

use super::Ctx;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_ctx: &Ctx, _args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("`patchctl agent` is not implemented yet")
}

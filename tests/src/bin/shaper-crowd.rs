//! The crowd helper: one crowd of real kernel TCP clients in its own process (see
//! `shaper_tests::crowd`). Started by the storm generator inside a client namespace;
//! reads its plan on stdin and prints the outcome of every client on stdout.

fn main() -> anyhow::Result<()> {
    shaper_tests::crowd::helper_main()
}

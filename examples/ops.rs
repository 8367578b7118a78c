//! Lists every op in the registry with its family and tolerance.
//!
//! `cargo run --example ops`

fn main() {
    let ops = corvid::kernels::registry();
    println!("{} ops", ops.len());
    println!("{:<14} {:<16} {:>8} {:>8}", "op", "family", "atol", "rtol");
    for spec in ops {
        let t = spec.tolerance;
        println!(
            "{:<14} {:<16} {:>8.0e} {:>8.0e}",
            spec.name, spec.family, t.atol, t.rtol
        );
    }
}

//! Every WGSL kernel parses and validates with naga: no GPU needed.

#![allow(clippy::unwrap_used)]

use corvid_kernels::gpu::kernel::Kernel;

#[test]
fn every_kernel_validates_with_naga() {
    let mut failures = Vec::new();
    for k in Kernel::all() {
        let src = k.source();
        let module = match naga::front::wgsl::parse_str(&src) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{}: parse: {}", k.label(), e.emit_to_string(&src)));
                continue;
            }
        };
        let mut v = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        if let Err(e) = v.validate(&module) {
            failures.push(format!(
                "{}: validate: {}",
                k.label(),
                e.emit_to_string(&src)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_registry_op_has_a_kernel_and_a_sample_that_names_it() {
    let ops = corvid_kernels::registry();
    assert!(ops.len() >= 40, "registry lists {} ops", ops.len());
    for spec in ops {
        let s = spec.sample(1);
        assert_eq!(
            s.op.name(),
            spec.name,
            "sample of '{}' builds another op",
            spec.name
        );
        let metas: Vec<_> = s.inputs.iter().map(|t| t.meta()).collect();
        let refs: Vec<_> = metas.iter().collect();
        let out = corvid_kernels::shape::infer(&s.op, &refs).expect("samples are valid");
        corvid_kernels::gpu::kernel::plan(&s.op, &refs, &out).expect("samples plan on the gpu");
    }
}

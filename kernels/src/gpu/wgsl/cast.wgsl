// dtype conversion between f32 and i32 (kernel.rs fills in FROM and TO); WGSL's conversions truncate toward zero
// and saturate, like Rust's `as`.
// prm: [0] n, [1] threads per grid row.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<{{TO}}>;
@group(0) @binding(2) var<storage, read> src: array<{{FROM}}>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * prm[1];
    if (i >= prm[0]) {
        return;
    }
    out[i] = {{TO}}(src[i]);
}

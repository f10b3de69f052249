//! Says so when JPEG decoding will be slow: mozjpeg-sys builds libjpeg-turbo's SIMD kernels only
//! when `nasm` is on the PATH, and otherwise falls back to portable C without a word. The
//! pixels are the same; the decoding is slower.

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    let x86 = matches!(
        std::env::var("CARGO_CFG_TARGET_ARCH").as_deref(),
        Ok("x86" | "x86_64")
    );
    if x86 && !nasm_found() {
        println!(
            "cargo:warning=nasm not found: JPEG decoding is built without libjpeg-turbo's SIMD \
             kernels (same pixels, about 25% slower per photo). Install nasm \
             (apt-get install nasm, dnf install nasm or brew install nasm) and rebuild."
        );
    }
}

fn nasm_found() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("nasm").is_file()))
}

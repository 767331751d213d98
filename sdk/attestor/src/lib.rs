//! The guest side of Castellan's attestor contract.
//!
//! An attestor module is built `no_std` so that it cannot reach WASI
//! (filesystem, clocks, environment, sockets) behind the host's back: its
//! only imports are the Castellan capabilities of `plugins-wasm/wit`. This
//! crate supplies what std would otherwise have given such a module on
//! wasm32: a global allocator over its own linear memory, a panic handler
//! that traps (the host then refuses the request), and the component model's
//! `cabi_realloc`. Depend on it and the module links.
//!
//! On other targets (native unit tests of a module's logic) it is empty.

#![cfg_attr(target_arch = "wasm32", no_std)]

#[cfg(target_arch = "wasm32")]
extern crate alloc;

#[cfg(target_arch = "wasm32")]
mod rt {
    use alloc::alloc::{Layout, alloc, realloc};

    #[global_allocator]
    static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

    /// A panic is a trap: the host sees the call fail and refuses the request.
    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        core::arch::wasm32::unreachable()
    }

    /// The canonical ABI's allocator, which std exports on wasip2.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn cabi_realloc(
        old_ptr: *mut u8,
        old_len: usize,
        align: usize,
        new_len: usize,
    ) -> *mut u8 {
        if new_len == 0 {
            return align as *mut u8;
        }
        // SAFETY: the canonical ABI passes a power-of-two alignment and, for a
        // reallocation, the pointer and size it was given earlier.
        let ptr = unsafe {
            if old_len == 0 {
                alloc(Layout::from_size_align_unchecked(new_len, align))
            } else {
                realloc(
                    old_ptr,
                    Layout::from_size_align_unchecked(old_len, align),
                    new_len,
                )
            }
        };
        if ptr.is_null() {
            core::arch::wasm32::unreachable()
        }
        ptr
    }
}

/// Call once from the module (e.g. at the top of `attest`) so the linker
/// keeps this crate, and with it the runtime above.
#[inline(always)]
pub fn link() {}

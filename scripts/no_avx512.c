/*
 * no_avx512.so: makes a process see a CPU without AVX-512 (and without AMX and AVX-VNNI), as
 * an AVX2 + FMA CPU such as a Zen 3 is, on a CPU that has them — so that onnxruntime runs the
 * kernels it runs on such a CPU, and the engine's AVX2 path (`MODELFLEET_ENGINE_NO_AVX512=1`)
 * can be compared with onnxruntime's AVX2 kernels on one machine (BENCHMARKS.md, session 23).
 *
 *   gcc -O2 -shared -fPIC -o /tmp/no_avx512.so scripts/no_avx512.c
 *   LD_PRELOAD=/tmp/no_avx512.so python3 scripts/bench_ort.py --seconds 1.5
 *
 * How: Linux's CPUID faulting (`arch_prctl(ARCH_SET_CPUID, 0)`, where the CPU offers it:
 * `cpuid_fault` in /proc/cpuinfo). From then on every `cpuid` instruction in the process (and
 * the threads it starts) raises SIGSEGV; the handler runs the real `cpuid` with faulting off
 * for a moment, clears the feature bits, and resumes after the instruction. Libraries that
 * choose kernels by `cpuid` (onnxruntime's MLAS does, at its first session) then choose their
 * AVX2 ones. `xgetbv` still reports the AVX-512 register state as enabled: MLAS needs both.
 * Only for measuring; it changes no instruction the CPU can run.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static void masked_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31. */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) |
                  (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14. */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24,
         * AMX-INT8 25. */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                  (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512_BF16 5. */
        r[0] &= ~((1u << 4) | (1u << 5));
    }
}

static void on_sigsegv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {
        /* A real fault: as if there were no handler. */
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t r[4];
    masked_cpuid((uint32_t)g[REG_RAX], (uint32_t)g[REG_RCX], r);
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    (void)info;
}

__attribute__((constructor)) static void no_avx512(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsegv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("no_avx512: arch_prctl(ARCH_SET_CPUID) (no CPUID faulting on this CPU?)");
        exit(2);
    }
}

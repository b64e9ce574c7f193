/* Prints the host's TSC frequency in kHz: TSC cycles against CLOCK_MONOTONIC_RAW
 * over 200 ms. Each end is a (time, TSC) pair read as close together as
 * possible (the tightest of 32 tries), so the result is good to about one part
 * in a million. Run once per host boot by ember.host.tsc; under TCG the guest's
 * TSC is the host's, and stating its rate spares the guest kernel a calibration
 * against the emulated PIT that costs ~170 ms of boot and fails on a busy host. */
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_RAW, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void pair(uint64_t *ns, uint64_t *tsc)
{
    uint64_t best = ~0ull;
    for (int i = 0; i < 32; i++) {
        uint64_t a = rdtsc(), n = now_ns(), b = rdtsc();
        if (b - a < best) {
            best = b - a;
            *ns = n;
            *tsc = a + (b - a) / 2;
        }
    }
}

int main(void)
{
    uint64_t t0, c0, t1, c1;
    struct timespec pause = { 0, 200000000 };
    pair(&t0, &c0);
    nanosleep(&pause, NULL);
    pair(&t1, &c1);
    if (t1 <= t0 || c1 <= c0) return 1;
    printf("%llu\n", (unsigned long long)((c1 - c0) * 1000000ull / (t1 - t0)));
    return 0;
}

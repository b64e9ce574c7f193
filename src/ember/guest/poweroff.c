/*
 * ember-poweroff: a trivial init that powers the VM off at once.
 *
 * Used by the boot benchmark: the time from QEMU's start to its exit measures
 * the firmware + kernel boot alone. The kernel runs with reboot=t and QEMU
 * with -no-reboot, so reboot(RB_AUTOBOOT) ends QEMU.
 *
 * Build: gcc -static -Os -Wall -Wextra -o ember-poweroff poweroff.c
 */
#include <stdio.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
    if (getpid() != 1) {
        fprintf(stderr, "ember-poweroff: refusing to run as anything but PID 1\n");
        return 2;
    }
    reboot(RB_AUTOBOOT);
    perror("ember-poweroff: reboot");
    return 1;  /* PID 1 exiting panics the kernel; panic=-1 reboots: QEMU ends all the same */
}

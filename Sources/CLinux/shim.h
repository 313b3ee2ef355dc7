#ifndef FTS_TOKEND_CLINUX_SHIM_H
#define FTS_TOKEND_CLINUX_SHIM_H

// glibc headers and constants that Swift's Glibc module leaves out.
#include <malloc.h>        // malloc_trim(3), for the socket server
#include <sys/signalfd.h>  // signalfd(2), for the daemon's signals
#include <sys/pidfd.h>     // pidfd_open(2), pidfd_send_signal(2) (glibc 2.36), for onRotate signals

// O_PATH (open(2)) is defined by <fcntl.h> only under _GNU_SOURCE; its value is the kernel's ABI.
#ifndef O_PATH
#define O_PATH 010000000
#endif
static const int clinux_O_PATH = O_PATH;

// SO_PEERGROUPS (Linux 4.13): the supplementary groups of a Unix socket's peer, sorted ascending,
// as the kernel holds them; up to 256 are read.
#include <sys/socket.h>
#include <stdint.h>
#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif
static const int clinux_SO_PEERGROUPS = SO_PEERGROUPS;
struct clinux_peer_groups { uint32_t gids[256]; };

// SO_MEMINFO (Linux 4.6): a socket's memory counters. For a Unix stream socket, the one at
// SK_MEMINFO_WMEM_ALLOC is what it sent that its peer has not read yet: it falls as the peer reads.
#include <linux/sock_diag.h>
#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif
static const int clinux_SO_MEMINFO = SO_MEMINFO;
static const int clinux_SK_MEMINFO_WMEM_ALLOC = SK_MEMINFO_WMEM_ALLOC;
struct clinux_meminfo { uint32_t values[SK_MEMINFO_VARS]; };

// prctl(2) is variadic, which Swift cannot call: no core dump of the daemon, and its /proc files
// (memory, environment) are root's, not its user's.
#include <sys/prctl.h>
static inline int clinux_set_undumpable(void) { return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); }

// A process named by a descriptor, so that a signal cannot reach a process that took its pid since.
static inline int clinux_pidfd_open(pid_t pid) { return pidfd_open(pid, 0); }
static inline int clinux_pidfd_send_signal(int pidfd, int sig) { return pidfd_send_signal(pidfd, sig, 0, 0); }

#endif

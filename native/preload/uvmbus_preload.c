/* uvmbus_preload.so: run an unmodified VMBus userspace program against `uvmbus sim`.
 *
 * Loaded with LD_PRELOAD by `uvmbus sim exec` (uvmbus/sim/execns.py), which also puts the
 * simulated sysfs tree at the real paths in a private mount namespace.  This library does the
 * one thing a mount cannot: it makes "/dev/uioN" behave like the kernel's uio character device
 * (drivers/uio/uio.c) over the simulator's endpoint socket <root>/dev/uioN (protocol 1, see
 * uvmbus/uio/endpoint.py and docs/simulator.md):
 *
 *   open    connects, takes the hello (eventfd + one fd per map) and hands the program an
 *           epoll fd watching the eventfd and the socket: a real fd, so poll/select/epoll on
 *           it work natively (readable = an interrupt is pending, or the device is gone);
 *   read    4 bytes only (else EINVAL); the cumulative interrupt count; blocks unless the fd
 *           is O_NONBLOCK (EAGAIN); EIO once the host rescinded the device;
 *   write   4 bytes only: irqcontrol (sent to the host as the protocol's 4-byte message);
 *   mmap    offset K * page size maps map K (EINVAL when the device has no map K or the
 *           length exceeds it);
 *   close   asks the host to close this file and returns after its answer (the teardown);
 *   fstat   a character device (major 0 minor N: the number is not real);
 *   ioctl   none: uio defines none; FIONBIO/FIOCLEX act on the stand-in fd natively.
 *
 * With UVMBUS_PRELOAD_GUEST_RAM=1 (`uvmbus sim exec --guest-ram`) the DMA memory of a DPDK
 * program is the simulator's guest RAM, so IOVA (= VA with --iova-mode=va) = simulated GPA:
 * rte_eal_init is wrapped to enforce --no-huge and --iova-mode=va and to claim the memory
 * (-m) from the guest RAM allocator (uvmbus/dma/sim.py, format 1); EAL's one anonymous
 * reservation of that size is placed at the GPA and its fixed anonymous mapping there becomes
 * a shared mapping of the guest RAM file.
 *
 * Environment: UVMBUS_SIM_ROOT (required), UVMBUS_PRELOAD_GUEST_RAM, UVMBUS_PRELOAD_DEBUG.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_UIO_FDS 256
#define MAX_MAPS 8
#define HELLO_MAX 4096

struct uio_file {
    int fd;                 /* the program's fd (an epoll fd); -1 = free slot */
    int sock;
    int efd;
    unsigned num;
    unsigned long page_size;
    int nmaps;
    int map_index[MAX_MAPS];
    int map_fd[MAX_MAPS];
    uint64_t map_size[MAX_MAPS];
    uint64_t map_gpa[MAX_MAPS];     /* GPA of a map in simulated guest RAM (0 = none) */
    uint32_t count;
    int revoked;
};

static struct uio_file files[MAX_UIO_FDS];
static pthread_mutex_t files_lock = PTHREAD_MUTEX_INITIALIZER;
static int debug;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_write)(int, const void *, size_t);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static void *(*real_mmap64)(void *, size_t, int, int, int, off_t);
static int (*real_close)(int);
static int (*real_fstat)(int, struct stat *);
static int (*real_fstat64)(int, struct stat64 *);

static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    int n = snprintf(buf, sizeof(buf), "uvmbus-preload: ");
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    if (real_write)
        (void)!real_write(2, buf, (size_t)n);
}

#define RESOLVE(var, name) do { if (!(var)) *(void **)&(var) = dlsym(RTLD_NEXT, name); } while (0)

static void resolve(void)
{
    RESOLVE(real_open, "open");
    RESOLVE(real_open64, "open64");
    RESOLVE(real_openat, "openat");
    RESOLVE(real_read, "read");
    RESOLVE(real_write, "write");
    RESOLVE(real_mmap, "mmap");
    RESOLVE(real_mmap64, "mmap64");
    RESOLVE(real_close, "close");
    RESOLVE(real_fstat, "fstat");
    RESOLVE(real_fstat64, "fstat64");
}

__attribute__((constructor)) static void preload_init(void)
{
    for (int i = 0; i < MAX_UIO_FDS; i++)
        files[i].fd = -1;
    resolve();
    debug = getenv("UVMBUS_PRELOAD_DEBUG") != NULL;
}

static struct uio_file *lookup(int fd)
{
    if (fd < 0)
        return NULL;
    for (int i = 0; i < MAX_UIO_FDS; i++)
        if (__atomic_load_n(&files[i].fd, __ATOMIC_ACQUIRE) == fd)
            return &files[i];
    return NULL;
}

/* "/dev/uioN" (N decimal) -> N; else -1 */
static long uio_number(const char *path)
{
    if (!path || strncmp(path, "/dev/uio", 8) != 0 || !path[8])
        return -1;
    char *end;
    errno = 0;
    unsigned long n = strtoul(path + 8, &end, 10);
    if (*end || errno || n > 1000000)
        return -1;
    return (long)n;
}

/* the number after "key": in a flat JSON text, from *pos on; advances *pos */
static int json_number(const char *text, const char *key, const char **pos, unsigned long long *out)
{
    const char *p = strstr(*pos, key);
    if (!p)
        return -1;
    p += strlen(key);
    while (*p == ' ' || *p == ':')
        p++;
    char *end;
    errno = 0;
    *out = strtoull(p, &end, 10);
    if (end == p || errno)
        return -1;
    *pos = end;
    (void)text;
    return 0;
}

static void close_fds(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            real_close(fds[i]);
}

static int uio_open(long num, int flags)
{
    const char *root = getenv("UVMBUS_SIM_ROOT");
    if (!root || !*root) {
        say("/dev/uio%ld: UVMBUS_SIM_ROOT is not set; run the program with `uvmbus sim exec`", num);
        errno = ENOENT;
        return -1;
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if ((size_t)snprintf(addr.sun_path, sizeof(addr.sun_path), "%s/dev/uio%ld", root, num)
            >= sizeof(addr.sun_path)) {
        say("simulator root %s is too long for a socket path", root);
        errno = ENAMETOOLONG;
        return -1;
    }
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int e = errno;
        if (e == ENOENT)
            say("/dev/uio%ld: no such simulated device (%s missing): is the device bound to "
                "uio_hv_generic in the simulator?", num, addr.sun_path);
        else if (e == ECONNREFUSED)
            say("/dev/uio%ld: the simulator does not answer on %s: is `uvmbus sim` running "
                "with this root?", num, addr.sun_path);
        else
            say("/dev/uio%ld: connect %s: %s", num, addr.sun_path, strerror(e));
        real_close(sock);
        errno = (e == ECONNREFUSED) ? ENODEV : e;
        return -1;
    }
    struct timeval tv = {.tv_sec = 10};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));

    char text[HELLO_MAX + 1];
    int fds[1 + MAX_MAPS];
    int nfds = 0;
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * (1 + MAX_MAPS))]; } cbuf;
    struct iovec iov = {.iov_base = text, .iov_len = HELLO_MAX};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = cbuf.buf, .msg_controllen = sizeof(cbuf.buf)};
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n > 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < k && nfds < 1 + MAX_MAPS; i++)
                    memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            }
        }
    }
    if (n <= 0 || (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) || nfds < 1) {
        say("/dev/uio%ld: no valid hello from the simulator (%s)", num,
            n < 0 ? strerror(errno) : "short or truncated message");
        close_fds(fds, nfds);
        real_close(sock);
        errno = EIO;
        return -1;
    }
    text[n] = 0;
    const char *pos = text;
    unsigned long long proto = 0, page = 0;
    if (json_number(text, "\"proto\"", &pos, &proto) || proto != 1) {
        say("/dev/uio%ld: the simulator speaks protocol %llu, this library speaks 1", num, proto);
        close_fds(fds, nfds);
        real_close(sock);
        errno = EPROTO;
        return -1;
    }
    pos = text;
    if (json_number(text, "\"page_size\"", &pos, &page) || page == 0 || (page & (page - 1))) {
        say("/dev/uio%ld: bad page_size in the hello", num);
        close_fds(fds, nfds);
        real_close(sock);
        errno = EPROTO;
        return -1;
    }
    struct uio_file f = {.sock = sock, .efd = fds[0], .num = (unsigned)num, .page_size = page};
    pos = text;
    const char *maps = strstr(text, "\"maps\"");
    pos = maps ? maps : text + n;
    for (;;) {
        unsigned long long idx, size;
        const char *save = pos;
        if (json_number(text, "\"index\"", &pos, &idx))
            break;
        if (json_number(text, "\"size\"", &pos, &size) || f.nmaps >= MAX_MAPS || idx > 64) {
            pos = save;
            break;
        }
        f.map_index[f.nmaps] = (int)idx;
        f.map_size[f.nmaps] = size;
        /* optional "gpa" of this map: before the next map's "index" */
        const char *next = strstr(pos, "\"index\"");
        const char *g = strstr(pos, "\"gpa\"");
        unsigned long long gpa = 0;
        if (g && (!next || g < next) && !json_number(text, "\"gpa\"", &pos, &gpa))
            f.map_gpa[f.nmaps] = gpa;
        f.nmaps++;
    }
    if (nfds != 1 + f.nmaps) {
        say("/dev/uio%ld: hello carried %d fds for %d maps", num, nfds, f.nmaps);
        close_fds(fds, nfds);
        real_close(sock);
        errno = EPROTO;
        return -1;
    }
    for (int i = 0; i < f.nmaps; i++)
        f.map_fd[i] = fds[1 + i];

    int ep = epoll_create1((flags & O_CLOEXEC) ? EPOLL_CLOEXEC : 0);
    if (ep < 0) {
        int e = errno;
        close_fds(fds, nfds);
        real_close(sock);
        errno = e;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = f.efd;
    epoll_ctl(ep, EPOLL_CTL_ADD, f.efd, &ev);
    ev.data.fd = sock;
    epoll_ctl(ep, EPOLL_CTL_ADD, sock, &ev);
    if (flags & O_NONBLOCK)
        fcntl(ep, F_SETFL, O_NONBLOCK);
    int fl = fcntl(f.efd, F_GETFL);
    fcntl(f.efd, F_SETFL, fl | O_NONBLOCK);
    f.fd = ep;

    pthread_mutex_lock(&files_lock);
    int slot = -1;
    for (int i = 0; i < MAX_UIO_FDS; i++)
        if (files[i].fd < 0) {
            slot = i;
            break;
        }
    if (slot < 0) {
        pthread_mutex_unlock(&files_lock);
        say("too many open /dev/uio files (%d)", MAX_UIO_FDS);
        close_fds(fds, nfds);
        real_close(sock);
        real_close(ep);
        errno = EMFILE;
        return -1;
    }
    f.fd = -1;
    files[slot] = f;
    __atomic_store_n(&files[slot].fd, ep, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&files_lock);
    if (debug)
        say("/dev/uio%ld opened as fd %d (%d maps, page %llu)", num, ep, f.nmaps, page);
    return ep;
}

/* Handle pending messages from the host; returns nonzero once the device is gone. */
static int poll_control(struct uio_file *f)
{
    char buf[512];
    while (!f->revoked) {
        ssize_t n = recv(f->sock, buf, sizeof(buf) - 1, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            f->revoked = 1;
        } else if (n == 0) {
            f->revoked = 1;
        } else {
            buf[n] = 0;
            if (strstr(buf, "\"rescind\""))
                f->revoked = 1;
        }
        if (f->revoked && debug)
            say("/dev/uio%u: the host rescinded the device", f->num);
    }
    return f->revoked;
}

static ssize_t uio_read(struct uio_file *f, void *buf, size_t len)
{
    if (len != sizeof(uint32_t)) {
        errno = EINVAL;
        return -1;
    }
    for (;;) {
        if (poll_control(f)) {
            errno = EIO;
            return -1;
        }
        uint64_t v;
        ssize_t n = real_read(f->efd, &v, sizeof(v));
        if (n == sizeof(v)) {
            f->count += (uint32_t)v;
            memcpy(buf, &f->count, sizeof(f->count));
            return sizeof(uint32_t);
        }
        if (n < 0 && errno != EAGAIN)
            return -1;
        if (fcntl(f->fd, F_GETFL) & O_NONBLOCK) {
            errno = EAGAIN;
            return -1;
        }
        struct pollfd p[2] = {{.fd = f->efd, .events = POLLIN}, {.fd = f->sock, .events = POLLIN}};
        if (poll(p, 2, -1) < 0)
            return -1;          /* EINTR: like a signal during a real uio read */
    }
}

static ssize_t uio_write(struct uio_file *f, const void *buf, size_t len)
{
    if (len != sizeof(uint32_t)) {
        errno = EINVAL;
        return -1;
    }
    if (poll_control(f)) {
        errno = EIO;
        return -1;
    }
    if (send(f->sock, buf, len, MSG_NOSIGNAL) != (ssize_t)len) {
        f->revoked = 1;
        errno = EIO;
        return -1;
    }
    return (ssize_t)len;
}

static void *uio_mmap(struct uio_file *f, void *addr, size_t len, int prot, int flags, off_t off)
{
    if (off < 0 || (unsigned long)off % f->page_size) {
        errno = EINVAL;
        return MAP_FAILED;
    }
    int k = (int)((unsigned long)off / f->page_size);
    for (int i = 0; i < f->nmaps; i++) {
        if (f->map_index[i] != k)
            continue;
        uint64_t limit = (f->map_size[i] + f->page_size - 1) / f->page_size * f->page_size;
        if (len == 0 || len > limit) {
            say("/dev/uio%u: mmap of map %d: %zu bytes asked, the map has %llu", f->num, k, len,
                (unsigned long long)f->map_size[i]);
            errno = EINVAL;
            return MAP_FAILED;
        }
        const char *ge = getenv("UVMBUS_PRELOAD_GUEST_RAM");
        if (f->map_gpa[i] && ge && !strcmp(ge, "1")) {
            /* a map in simulated guest RAM (the NIC buffers): at VA = its GPA, so that a
             * program using IOVA = VA sends GPA-direct ranges that point into it */
            void *want = (void *)(uintptr_t)f->map_gpa[i];
            void *r = real_mmap(want, len, prot, (flags & ~MAP_FIXED) | MAP_FIXED_NOREPLACE,
                                f->map_fd[i], 0);
            if (r == MAP_FAILED)
                say("/dev/uio%u: cannot map map %d at its GPA 0x%llx: %s", f->num, k,
                    (unsigned long long)f->map_gpa[i], strerror(errno));
            return r;
        }
        if (ge && !strcmp(ge, "1") && !(flags & MAP_FIXED))
            addr = NULL;    /* a hint (DPDK: "after its memory") could fall on the GPA of
                             * guest RAM or of a NIC buffer still to be mapped: let the
                             * kernel place maps that are not guest RAM */
        return real_mmap(addr, len, prot, flags, f->map_fd[i], 0);
    }
    say("/dev/uio%u: mmap of map %d: the device has no such map", f->num, k);
    errno = EINVAL;
    return MAP_FAILED;
}

static int uio_close(struct uio_file *f)
{
    struct uio_file c = *f;
    __atomic_store_n(&f->fd, -1, __ATOMIC_RELEASE);
    if (!c.revoked) {
        static const char req[] = "{\"op\": \"close\"}";
        if (send(c.sock, req, sizeof(req) - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof(req) - 1)) {
            char buf[512];
            for (;;) {       /* wait for the teardown (SO_RCVTIMEO bounds it) */
                ssize_t n = recv(c.sock, buf, sizeof(buf) - 1, 0);
                if (n <= 0)
                    break;
                buf[n] = 0;
                if (strstr(buf, "\"closed\"") || strstr(buf, "\"rescind\""))
                    break;
            }
        }
    }
    for (int i = 0; i < c.nmaps; i++)
        real_close(c.map_fd[i]);
    real_close(c.efd);
    real_close(c.sock);
    if (debug)
        say("/dev/uio%u closed", c.num);
    return real_close(c.fd);
}

static void fake_stat(struct uio_file *f, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_mode = S_IFCHR | 0600;
    st->st_rdev = makedev(0, f->num);
    st->st_nlink = 1;
    st->st_blksize = (blksize_t)f->page_size;
}

/* ---- interposed libc entry points ------------------------------------------------------- */

static int open_common(int (*real)(const char *, int, ...), const char *path, int flags,
                       va_list ap)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE))
        mode = (mode_t)va_arg(ap, int);
    long num = uio_number(path);
    if (num >= 0)
        return uio_open(num, flags);
    resolve();
    return real(path, flags, mode);
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    resolve();
    int r = open_common(real_open, path, flags, ap);
    va_end(ap);
    return r;
}

int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    resolve();
    int r = open_common(real_open64, path, flags, ap);
    va_end(ap);
    return r;
}

int __open_2(const char *path, int flags)
{
    resolve();
    long num = uio_number(path);
    return num >= 0 ? uio_open(num, flags) : real_open(path, flags);
}

int __open64_2(const char *path, int flags)
{
    resolve();
    long num = uio_number(path);
    return num >= 0 ? uio_open(num, flags) : real_open64(path, flags);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    mode_t mode = 0;
    va_start(ap, flags);
    if (flags & (O_CREAT | O_TMPFILE))
        mode = (mode_t)va_arg(ap, int);
    va_end(ap);
    resolve();
    long num = uio_number(path);
    if (num >= 0)
        return uio_open(num, flags);
    return real_openat(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

ssize_t read(int fd, void *buf, size_t len)
{
    struct uio_file *f = lookup(fd);
    if (f)
        return uio_read(f, buf, len);
    resolve();
    return real_read(fd, buf, len);
}

ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen)
{
    if (len > buflen) {
        fprintf(stderr, "*** buffer overflow detected ***: read\n");
        abort();
    }
    return read(fd, buf, len);
}

ssize_t write(int fd, const void *buf, size_t len)
{
    struct uio_file *f = lookup(fd);
    if (f)
        return uio_write(f, buf, len);
    resolve();
    return real_write(fd, buf, len);
}

static void *mmap_guest_ram(void *addr, size_t len, int prot, int flags, int fd, off_t off,
                            int *handled);

/* The simulator keeps a closed channel's `ring` file as a hard link to a stand-in,
 * <root>/sim/rings/<relid>.closed (the file exists from bind, as on a real kernel); mapping a
 * ring whose channel is not open fails on a real kernel (uio_hv_generic: ENODEV). */
static int is_closed_ring(int fd)
{
    static dev_t rings_dev;
    static int have_dev = -1;
    const char *root = getenv("UVMBUS_SIM_ROOT");
    char dir[4096];
    struct stat st, rs;
    if (!root || fd < 0 || real_fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return 0;
    snprintf(dir, sizeof(dir), "%s/sim/rings", root);
    if (have_dev < 0) {
        have_dev = stat(dir, &rs) == 0;
        rings_dev = have_dev ? rs.st_dev : 0;
    }
    if (!have_dev || st.st_dev != rings_dev)
        return 0;
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int found = 0;
    for (struct dirent *e; !found && (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (n > 7 && !strcmp(e->d_name + n - 7, ".closed") && e->d_ino == st.st_ino) {
            struct stat cs;
            found = fstatat(dirfd(d), e->d_name, &cs, 0) == 0 && cs.st_ino == st.st_ino &&
                    cs.st_dev == st.st_dev;
        }
    }
    closedir(d);
    return found;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    struct uio_file *f = lookup(fd);
    if (f)
        return uio_mmap(f, addr, len, prot, flags, off);
    resolve();
    if (fd >= 0 && is_closed_ring(fd)) {
        say("mmap of a ring file whose channel is not open: ENODEV (as uio_hv_generic)");
        errno = ENODEV;
        return MAP_FAILED;
    }
    int handled = 0;
    void *r = mmap_guest_ram(addr, len, prot, flags, fd, off, &handled);
    if (handled)
        return r;
    return real_mmap(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
    __attribute__((alias("mmap")));

int close(int fd)
{
    struct uio_file *f = lookup(fd);
    resolve();
    if (f) {
        pthread_mutex_lock(&files_lock);
        f = lookup(fd);
        int r;
        if (f) {
            r = uio_close(f);
            pthread_mutex_unlock(&files_lock);
            return r;
        }
        pthread_mutex_unlock(&files_lock);
    }
    return real_close(fd);
}

int fstat(int fd, struct stat *st)
{
    struct uio_file *f = lookup(fd);
    if (f) {
        fake_stat(f, st);
        return 0;
    }
    resolve();
    return real_fstat(fd, st);
}

int fstat64(int fd, struct stat64 *st)
{
    struct uio_file *f = lookup(fd);
    if (f) {
        fake_stat(f, (struct stat *)st);
        return 0;
    }
    resolve();
    return real_fstat64(fd, st);
}

/* ---- --guest-ram: EAL memory on the simulator's guest RAM --------------------------------- */


static struct {
    int armed;              /* UVMBUS_PRELOAD_GUEST_RAM=1 and the claim succeeded */
    int fd;                 /* guest-ram file */
    uint64_t len;           /* EAL memory size we expect to see reserved */
    uint64_t gpa;           /* GPA (= VA = IOVA) of the claimed region */
    uint64_t file_off;
    int alloc_fd;
    uint64_t first, count;  /* claimed chunks */
    uint64_t ram_end;       /* GPA one past the guest RAM */
    uint64_t chunk;
    int reserved, mapped;
} gr = {.fd = -1, .alloc_fd = -1};

static int read_text(const char *path, char *buf, size_t len)
{
    int fd = real_open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = real_read(fd, buf, len - 1);
    real_close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    return 0;
}

/* start time of a process (field 22 of /proc/PID/stat); 0 = gone (or zombie) */
static uint64_t start_time(unsigned pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%u/stat", pid);
    if (read_text(path, buf, sizeof(buf)) < 0)
        return 0;
    char *p = strrchr(buf, ')');
    if (!p || !p[1] || !p[2])
        return 0;
    p += 2;
    if (*p == 'Z' || *p == 'X')
        return 0;
    for (int field = 3; field < 22 && p; field++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return p ? strtoull(p, NULL, 10) : 0;
}

struct alloc_rec { uint32_t pid, reserved; uint64_t start; };

static void release_guest_ram(void)
{
    if (gr.alloc_fd < 0 || !gr.count)
        return;
    flock(gr.alloc_fd, LOCK_EX);
    struct alloc_rec zero = {0};
    for (uint64_t i = 0; i < gr.count; i++)
        (void)!pwrite(gr.alloc_fd, &zero, sizeof(zero), (off_t)((gr.first + i) * sizeof(zero)));
    flock(gr.alloc_fd, LOCK_UN);
    gr.count = 0;
}

static int claim_guest_ram(uint64_t want)
{
    const char *root = getenv("UVMBUS_SIM_ROOT");
    char path[4096], meta[1024];
    if (!root) {
        say("--guest-ram: UVMBUS_SIM_ROOT is not set; run the program with `uvmbus sim exec`");
        return -1;
    }
    snprintf(path, sizeof(path), "%s/sim/guest-ram.json", root);
    if (read_text(path, meta, sizeof(meta)) < 0) {
        say("--guest-ram: %s: %s (start the simulator with --guest-ram SIZE)", path, strerror(errno));
        return -1;
    }
    unsigned long long base_pfn, size, chunk;
    const char *pos = meta;
    if (json_number(meta, "\"base_pfn\"", &pos, &base_pfn)) return say("--guest-ram: bad %s", path), -1;
    pos = meta;
    if (json_number(meta, "\"size\"", &pos, &size)) return say("--guest-ram: bad %s", path), -1;
    pos = meta;
    if (json_number(meta, "\"chunk\"", &pos, &chunk) || !chunk || size % chunk)
        return say("--guest-ram: bad %s", path), -1;
    uint64_t nchunks = size / chunk, count = (want + chunk - 1) / chunk;
    snprintf(path, sizeof(path), "%s/sim/guest-ram", root);
    gr.fd = real_open(path, O_RDWR | O_CLOEXEC);
    snprintf(path, sizeof(path), "%s/sim/guest-ram.alloc", root);
    gr.alloc_fd = real_open(path, O_RDWR | O_CLOEXEC);
    if (gr.fd < 0 || gr.alloc_fd < 0) {
        say("--guest-ram: cannot open the guest RAM files under %s/sim: %s", root, strerror(errno));
        return -1;
    }
    size_t tlen = nchunks * sizeof(struct alloc_rec);
    struct alloc_rec *table = malloc(tlen);
    if (!table)
        return -1;
    flock(gr.alloc_fd, LOCK_EX);
    int ok = pread(gr.alloc_fd, table, tlen, 0) == (ssize_t)tlen;
    uint64_t run = 0, first = 0;
    for (uint64_t i = 0; ok && i < nchunks; i++) {
        int free_ = table[i].pid == 0;
        if (!free_) {
            uint64_t now = start_time(table[i].pid);
            free_ = now == 0 || (table[i].start && now != table[i].start);
        }
        run = free_ ? run + 1 : 0;
        if (run == count) {
            first = i + 1 - count;
            break;
        }
    }
    if (ok && run == count) {
        struct alloc_rec me = {.pid = (uint32_t)getpid(), .start = start_time((unsigned)getpid())};
        for (uint64_t i = 0; i < count; i++)
            (void)!pwrite(gr.alloc_fd, &me, sizeof(me), (off_t)((first + i) * sizeof(me)));
    }
    flock(gr.alloc_fd, LOCK_UN);
    free(table);
    if (!ok || run != count) {
        say("--guest-ram: the simulator's guest RAM (%llu bytes) has no %llu free contiguous "
            "bytes for EAL's -m; start `uvmbus sim` with a larger --guest-ram (at least -m plus "
            "what other guests use) or give EAL less memory", size,
            (unsigned long long)(count * chunk));
        return -1;
    }
    gr.first = first;
    gr.count = count;
    gr.chunk = chunk;
    gr.file_off = first * chunk;
    gr.gpa = base_pfn * 4096ull + gr.file_off;
    gr.len = want;
    gr.ram_end = base_pfn * 4096ull + size;
    /* a region is zeroed when taken */
    fallocate(gr.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)gr.file_off,
              (off_t)(count * chunk));
    atexit(release_guest_ram);
    gr.armed = 1;
    if (debug)
        say("--guest-ram: %llu bytes at GPA 0x%llx (chunks %llu..%llu)",
            (unsigned long long)want, (unsigned long long)gr.gpa, (unsigned long long)first,
            (unsigned long long)(first + count - 1));
    return 0;
}

static void *mmap_guest_ram(void *addr, size_t len, int prot, int flags, int fd, off_t off,
                            int *handled)
{
    if (!gr.armed || len != gr.len)
        return NULL;
    if (!gr.mapped && prot == PROT_NONE && fd == -1 && (flags & MAP_ANONYMOUS) &&
            !(flags & MAP_FIXED)) {
        /* EAL reserving the address space of its memory: put it at the GPA.  EAL asks for
         * its next base address as a hint, frees a mismatch and retries a few times, then
         * takes what it got (eal_get_virtual_area): every attempt gets the GPA. */
        *handled = 1;
        void *r = real_mmap((void *)(uintptr_t)gr.gpa, len, PROT_NONE,
                            flags | MAP_FIXED_NOREPLACE, -1, 0);
        if (r == MAP_FAILED) {
            say("--guest-ram: cannot reserve VA 0x%llx (+%zu) for EAL memory: %s",
                (unsigned long long)gr.gpa, len, strerror(errno));
            return r;
        }
        gr.reserved = 1;
        return r;
    }
    if (gr.reserved && !gr.mapped && (flags & MAP_FIXED) && (uintptr_t)addr == gr.gpa) {
        /* EAL backing it: the guest RAM file instead of anonymous memory or its own file */
        *handled = 1;
        void *r = real_mmap(addr, len, prot, MAP_SHARED | MAP_FIXED, gr.fd, (off_t)gr.file_off);
        if (r != MAP_FAILED)
            gr.mapped = 1;
        (void)off;
        return r;
    }
    return NULL;
}

/* size of EAL memory from its arguments: -m MB / --socket-mem=a,b,...; 0 = EAL's default */
static uint64_t eal_mem_arg(int argc, char **argv)
{
    uint64_t mb = 0;
    for (int i = 1; i < argc && argv[i]; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--"))
            break;
        if (!strcmp(a, "-m") && i + 1 < argc)
            mb = strtoull(argv[++i], NULL, 0);
        else if (!strncmp(a, "-m", 2) && a[2] >= '0' && a[2] <= '9')
            mb = strtoull(a + 2, NULL, 0);
        else if (!strncmp(a, "--socket-mem", 12)) {
            const char *v = a[12] == '=' ? a + 13 : (i + 1 < argc ? argv[++i] : "");
            mb = 0;
            while (*v) {
                char *end;
                mb += strtoull(v, &end, 0);
                v = *end == ',' ? end + 1 : end + (*end != 0);
            }
        }
    }
    return mb << 20;
}

static int has_arg(int argc, char **argv, const char *name, const char **value)
{
    size_t n = strlen(name);
    for (int i = 1; i < argc && argv[i]; i++) {
        if (!strcmp(argv[i], "--"))
            break;
        if (!strncmp(argv[i], name, n) && (argv[i][n] == 0 || argv[i][n] == '=')) {
            if (value)
                *value = argv[i][n] == '=' ? argv[i] + n + 1 : (i + 1 < argc ? argv[i + 1] : "");
            return 1;
        }
    }
    return 0;
}

#define EAL_DEFAULT_NOHUGE_MEM (64ull << 20)     /* DPDK's MEMSIZE_IF_NO_HUGE_PAGE */

int rte_eal_init(int argc, char **argv)
{
    static int (*real_init)(int, char **);
    resolve();
    if (!real_init)
        *(void **)&real_init = dlsym(RTLD_NEXT, "rte_eal_init");
    if (!real_init) {
        say("rte_eal_init: DPDK's EAL is not loaded");
        errno = ENOSYS;
        return -1;
    }
    const char *ge = getenv("UVMBUS_PRELOAD_GUEST_RAM");
    if (!ge || strcmp(ge, "1") != 0) {
        say("note: without `uvmbus sim exec --guest-ram` DPDK's memory is not simulated guest "
            "RAM, so the GPA-direct packets of its netvsc PMD (RNDIS control, large frames) "
            "fail at the host");
        return real_init(argc, argv);
    }

    const char *iova = NULL;
    if (has_arg(argc, argv, "--iova-mode", &iova) && strcmp(iova, "va") != 0) {
        say("--guest-ram needs EAL's --iova-mode=va (IOVA = VA = simulated GPA), not %s", iova);
        errno = EINVAL;
        return -1;
    }
    if (has_arg(argc, argv, "--base-virtaddr", NULL)) {
        say("--guest-ram places EAL's memory itself: drop --base-virtaddr");
        errno = EINVAL;
        return -1;
    }
    uint64_t mem = eal_mem_arg(argc, argv);
    if (!mem)
        mem = EAL_DEFAULT_NOHUGE_MEM;
    if (claim_guest_ram(mem) < 0) {
        errno = ENOMEM;
        return -1;
    }
    char **args = calloc((size_t)argc + 4, sizeof(char *));
    if (!args)
        return -1;
    int n = 0, extra = 0;
    args[n++] = argv[0];
    /* EAL's other virtual areas (config, memseg arrays) start at its base address, by default
     * 4 GiB, where the simulated guest RAM usually starts: move them past the guest RAM so
     * that the GPA range stays free for the memory itself. */
    static char base_arg[64];
    /* 16 GiB of room after the guest RAM: the simulator places NIC buffers there */
    snprintf(base_arg, sizeof(base_arg), "--base-virtaddr=0x%llx",
             (unsigned long long)(((gr.ram_end + (1ull << 30) - 1) & ~((1ull << 30) - 1)) +
                                  (16ull << 30)));
    args[n++] = base_arg;
    extra++;
    if (!has_arg(argc, argv, "--no-huge", NULL)) {
        args[n++] = (char *)"--no-huge";
        extra++;
    }
    if (!iova) {
        args[n++] = (char *)"--iova-mode=va";
        extra++;
    }
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    if (debug)
        for (int i = 1; i <= extra; i++)
            say("--guest-ram: EAL argument %s added", args[i]);
    int r = real_init(n, args);
    if (r >= 0 && !gr.mapped) {
        say("--guest-ram: EAL did not map its memory where expected (%llu bytes); this DPDK "
            "version lays out memory differently", (unsigned long long)gr.len);
    }
    return r >= extra ? r - extra : r;
}

/*
 * loadgen.c - minimal WebSocket load generator for bench/run.py.
 *
 * Why C: 1,000 Python subscribers cannot absorb >100k frames/s, and the
 * client must spend less CPU per delivery than the server it measures, or
 * the benchmark measures the client.  So: one thread, one epoll set,
 * non-blocking sockets, one shared read buffer, no allocations per frame.
 *
 * Build: gcc -O2 -o loadgen loadgen.c      (no extra libraries)
 *
 * One run = one scenario against one server.  The result is ONE line of
 * JSON on stdout.  With --hold the process then keeps every socket open
 * until stdin reaches EOF, so run.py can stop the server first: closing
 * 1,000+ sockets first would make the naive server broadcast "left the
 * chat" O(n^2) times, which is not what we want to wait for.
 *
 * Every frame a subscriber receives is scanned for the marker "BENCH:" +
 * "<seq>:<send time in CLOCK_MONOTONIC ns>:".  Frames without it are
 * ignored for delivery counting (welcome, echo, ...); frames containing the
 * --presence string are counted as presence frames instead.  The same
 * publisher frame therefore works on servers that wrap it in JSON and on
 * servers that prefix it ("Client #pub says: BENCH:...").
 *
 * Mode "rooms" has no publisher: --rooms N x --members M connections, and
 * every one of them posts its own marker frames, one per --interval seconds
 * (a fixed interval from a random phase), to its room; each message should
 * come back to the room's M members, the sender included.
 *
 * Mode "storm" is a server restart under load: --rooms N x --members M
 * subscribers plus one publisher connection per room (a WebSocket is in one
 * room), which posts --rate messages/s round-robin over the rooms.  After the
 * warm-up and the --duration "before" window it prints "ready"; run.py then
 * SIGTERMs the server, starts it again on the same port and tells the loadgen
 * on stdin ("term <ns>", "pid <pid> <ns>", CLOCK_MONOTONIC).  Every closed
 * connection comes back with backoff, resuming with since=<last id>&epoch=.
 * Each message is tracked by its marker's sequence number: acknowledged (its
 * echo reached the publisher), received by which subscribers, received twice.
 *
 * --welcome STR marks the server's welcome frame: a connection then counts as
 * joined only once it has one (conns mode waits for all of them).
 * --src-addrs N binds connection i to source address 127.0.0.(2 + i % N), so
 * that more connections than one address has ephemeral ports can be opened.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24   /* Linux 4.2; older libcs lack the name */
#endif

/* ------------------------------------------------------------------ */
/* configuration                                                       */

static struct {
    const char *mode;      /* fanout | rate | slow | conns | join | rooms | storm */
    int port;
    int server_pid;
    const char *sub_path;  /* printf template, %d = subscriber index */
    const char *pub_path;
    const char *room_path; /* rooms mode: printf template, %d = room, %d = member */
    const char *presence;  /* substring that marks a presence frame */
    const char *error;     /* substring that marks an error frame from the server */
    const char *welcome;   /* substring that marks the welcome frame (joined = welcomed) */
    int subs, slow, concurrency, inflight, size, rooms, members, src_addrs;
    double duration, rate, warmup, drain, tail, settle_max, connect_timeout, interval, stall;
    double storm_timeout, backoff_min, backoff_max;
    int hold;
} cfg = {
    .mode = "fanout", .port = 8000, .server_pid = 0,
    .sub_path = "/ws/%d", .pub_path = "/ws/pub", .room_path = "/ws/r%d",
    .presence = NULL, .error = NULL, .welcome = NULL,
    .subs = 1000, .slow = 0, .concurrency = 200, .inflight = 10, .size = 0,
    .rooms = 1000, .members = 10,
    .duration = 10, .rate = 20, .warmup = 1, .drain = 5, .tail = 2,
    .settle_max = 5, .connect_timeout = 120, .interval = 2, .stall = 0,
    .storm_timeout = 60, .backoff_min = 0.05, .backoff_max = 2, .hold = 0,
};

/* ------------------------------------------------------------------ */
/* time, cpu, rss                                                      */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double self_cpu_us(void)
{
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec * 1e6 + r.ru_utime.tv_usec +
           r.ru_stime.tv_sec * 1e6 + r.ru_stime.tv_usec;
}

/* utime+stime of the whole server process (all threads), in microseconds. */
static double server_cpu_us(void)
{
    if (cfg.server_pid <= 0) return -1;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", cfg.server_pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* the command name may contain spaces: fields restart after the last ')' */
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    unsigned long long ut = 0, st = 0;
    /* after ')': state(3) ppid(4) ... minflt.. utime is field 14, stime 15 */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
               &ut, &st) != 2)
        return -1;
    return (double)(ut + st) * 1e6 / (double)sysconf(_SC_CLK_TCK);
}

static long server_rss_kb(void)
{
    if (cfg.server_pid <= 0) return -1;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", cfg.server_pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) { kb = strtol(line + 6, NULL, 10); break; }
    fclose(f);
    return kb;
}

/* ------------------------------------------------------------------ */
/* connections                                                         */

enum { K_SUB, K_PUB, K_SLOW };
enum { S_IDLE, S_CONNECTING, S_HS, S_OPEN, S_CLOSED, S_FAILED };

typedef struct {
    int fd, kind, state, attempts;
    int room;                /* rooms mode: index of its room */
    uint32_t events;         /* what epoll watches now (saves no-op EPOLL_CTL_MODs) */
    int close_code;          /* -1: no close frame seen */
    int eof;                 /* TCP EOF / reset seen */
    int http_status;         /* handshake status when not 101 */
    int slow_reading;        /* slow client switched to reading (final check) */
    int welcomed;            /* its --welcome frame arrived */
    char *in; uint32_t in_len, in_cap;   /* leftover partial frame / handshake */
    char *out; size_t out_len, out_off, out_cap;  /* unsent bytes */
    uint64_t join_ns, closed_ns;
    uint64_t frames, pres_frames, pres_bytes, delivered;
} conn_t;

static conn_t *conns;
static int nconns;
static int epfd;
static struct sockaddr_in srv;

/* shared read buffer: leftovers of a connection are copied to its front */
static char *scratch;
static size_t scratch_cap = 1 << 18;
static size_t frame_need;   /* size of the incomplete frame process_frames stopped at */

/* global counters */
static struct {
    int connected, failed, inflight_hs, next_to_connect, open_subs;
    int welcomed, awaiting_welcome; /* --welcome: frames seen; open connections still without one */
    int failed_fd, fd_errno;       /* socket() found no descriptor left: connecting stops there */
    int stalled;                   /* --stall: connecting gave up, nothing completed for that long */
    uint64_t last_join_ns, last_welcome_ns, last_presence_ns;
    uint64_t pres_frames, pres_bytes;
    uint64_t error_frames;        /* frames with the --error marker */
    uint64_t deliveries;          /* all marker frames at subscribers */
    int window;                   /* 1 while measuring */
    uint64_t win_first_seq;       /* rate mode: latencies only of messages sent in the window */
    uint64_t win_deliveries;
    uint64_t *lat; size_t lat_n, lat_cap;
    int closes_during_run;
    int protocol_errors;          /* unparseable frames from the server */
    int *retry; int retry_n;      /* connections waiting to be retried */
} g;

/* publisher state */
#define MAXSEQ (1u << 22)
static struct {
    conn_t *c;
    int active;                   /* 0: do not send */
    int closed_loop;
    uint32_t sent, completed, timed_out, oldest;
    uint32_t *count;              /* deliveries per seq */
    uint32_t *target;             /* subscribers expected per seq */
    uint64_t *sent_ns;
    uint64_t next_ns, interval_ns, stop_ns;
    uint32_t max_msgs;
    uint64_t bytes_dropped_unsent;
} pub;

/* rooms mode: every member posts on its own schedule.  All have the same
   interval, so the schedule is one array sorted by phase, walked round after
   round: O(1) per message, nothing allocated after the start. */
static struct {
    int active;
    int *order;                   /* connection indexes, by phase */
    uint64_t *phase_ns;           /* sorted, in [0, interval) */
    int next;                     /* cursor into order */
    uint64_t round_ns;            /* start of the current round */
    uint64_t interval_ns, stop_ns;
    uint64_t sent, skipped;       /* skipped: the member was not open */
    int *open_members;            /* per room */
    uint64_t win_first_seq;       /* the window's messages are seq >= this */
    uint64_t win_msgs, win_expected, win_delivered;
} rm = { .win_first_seq = UINT64_MAX };

/* storm mode: the server restarts under its clients.  conns[0..npubs) are the
   publisher's connections (one per room, room i), then the subscribers, room
   by room.  Message k of the publisher ("slot" k) goes to room k % npubs at
   pub_start + k / rate; everything about it is indexed by k, allocated once. */
typedef struct {
    uint64_t last_id;        /* newest message id received in its current epoch: the next since= */
    uint64_t welcome_last_id;/* "last_id" of its latest welcome: ids up to it are replay */
    uint64_t since;          /* the since= its current connection asked for */
    char epoch[40];          /* "epoch" of its latest welcome, "" before the first */
    uint8_t up;              /* open and welcomed */
    uint8_t back;            /* subscriber welcomed again after the SIGTERM */
    uint8_t resumed;         /* its current connection asked for since= */
    uint8_t fails;           /* attempts since it was last welcomed: the backoff's exponent */
} sconn_t;

typedef struct { uint64_t *v; size_t n; } lat_t;  /* room for one sample per slot */

static struct {
    int on, finishing;            /* finishing: closes are no longer reconnected */
    sconn_t *sc;
    int npubs, nsubs, up;         /* up: connections open and welcomed */
    /* the restart as run.py reports it on stdin, and what we saw of it */
    uint64_t term_ns, ready_ns, first_close_ns, first_welcome_ns, all_back_ns;
    int back;                     /* subscribers welcomed again since term_ns */
    double cpu_ready_us, cpu_back_us, lg_cpu_term_us, lg_cpu_back_us;
    /* reconnects: a binary min-heap of connection indexes by due time */
    int *heap, heap_n;
    uint64_t *due;
    uint64_t attempts, failed_attempts;
    uint64_t closes_1012, closes_1001, closes_other, closes_eof;
    uint64_t sub_recovered, sub_gap, pub_recovered, pub_gap, no_answer;  /* welcomes after a since= */
    uint64_t epoch_changes, replayed, dups, wrong_room;
    /* the publisher */
    int pub_active;
    uint64_t pub_start_ns, before_ns, pub_stop_ns;  /* before_ns: the "before" RTT window opens */
    uint32_t next_slot, max_slots;
    uint64_t skipped;             /* slots whose room's publisher connection was down */
    uint64_t *sent_ns;            /* 0: not sent */
    uint8_t *acked;               /* 1: its echo came back live; 2: replayed to the publisher on a resume */
    uint32_t *msg_id;             /* the server's id for it, from the echo (lost_examples) */
    uint32_t *got;                /* subscribers of its room that received it */
    uint64_t *seen;               /* per subscriber: one bit per slot of its room (duplicates) */
    int seen_words;
    lat_t rtt_before, rtt_storm;
} st;

static void die(const char *msg) { perror(msg); exit(2); }

static void ep_set(conn_t *c, uint32_t events, int op)
{
    if (op == EPOLL_CTL_MOD && c->events == events) return;
    c->events = events;
    struct epoll_event ev = { .events = events, .data.u32 = (uint32_t)(c - conns) };
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0 && op != EPOLL_CTL_DEL) die("epoll_ctl");
}

static void out_append(conn_t *c, const void *p, size_t n)
{
    if (c->out_off && c->out_off == c->out_len) c->out_off = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        /* compact first, then grow */
        if (c->out_off) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off; c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap : 512;
            while (cap < c->out_len + n) cap *= 2;
            c->out = realloc(c->out, cap);
            if (!c->out) die("realloc");
            c->out_cap = cap;
        }
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static uint32_t xr = 2463534242u;
static uint32_t xrand(void) { xr ^= xr << 13; xr ^= xr >> 17; xr ^= xr << 5; return xr; }

/* Client frames must be masked (RFC 6455 5.3). */
static void ws_frame(conn_t *c, int opcode, const char *p, size_t n)
{
    unsigned char h[14];
    size_t hl = 0;
    h[hl++] = 0x80 | (unsigned char)opcode;
    if (n < 126) h[hl++] = 0x80 | (unsigned char)n;
    else if (n < 65536) { h[hl++] = 0x80 | 126; h[hl++] = n >> 8; h[hl++] = n & 0xff; }
    else {
        h[hl++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) h[hl++] = (unsigned char)(((uint64_t)n >> (8 * i)) & 0xff);
    }
    uint32_t key = xrand();
    unsigned char k[4] = { key >> 24, key >> 16, key >> 8, key };
    memcpy(h + hl, k, 4); hl += 4;
    out_append(c, h, hl);
    out_append(c, p, n);   /* may compact the buffer: find the payload from the end */
    unsigned char *q = (unsigned char *)c->out + c->out_len - n;
    for (size_t i = 0; i < n; i++) q[i] ^= k[i & 3];
}

static void storm_lost(conn_t *c, int was_open, uint64_t t);

static void conn_close(conn_t *c, uint64_t t)
{
    if (c->state == S_CLOSED || c->state == S_FAILED || c->state == S_IDLE) return;
    int was_open = c->state == S_OPEN;
    if (!was_open) g.inflight_hs--;   /* it died mid-handshake */
    if (was_open && c->kind == K_SUB) g.open_subs--;
    if (was_open && rm.open_members) rm.open_members[c->room]--;
    if (was_open && g.window) g.closes_during_run++;
    if (was_open && cfg.welcome && !c->welcomed) g.awaiting_welcome--;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = S_CLOSED;
    c->closed_ns = t;
    if (st.on && !st.finishing) storm_lost(c, was_open, t);
}

/* try to write pending output; returns 0, or -1 if the connection died */
static int flush_out(conn_t *c, uint64_t t)
{
    while (c->out_off < c->out_len) {
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w > 0) { c->out_off += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        c->eof = 1;
        conn_close(c, t);
        return -1;
    }
    int pending = c->out_off < c->out_len;
    if (c->state == S_OPEN || c->state == S_HS) {
        uint32_t ev = (c->state == S_OPEN && c->kind == K_SLOW && !c->slow_reading)
                          ? EPOLLRDHUP : EPOLLIN | EPOLLRDHUP;
        if (pending) ev |= EPOLLOUT;
        ep_set(c, ev, EPOLL_CTL_MOD);
    }
    if (!pending) c->out_off = c->out_len = 0;
    return 0;
}

/* ------------------------------------------------------------------ */
/* connecting                                                          */

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void storm_retry(conn_t *c, uint64_t t);
static size_t storm_path(conn_t *c, char *path, size_t cap);

static void start_connect(conn_t *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        if (errno != EMFILE && errno != ENFILE && errno != ENOBUFS && errno != ENOMEM) die("socket");
        /* out of descriptors (RLIMIT_NOFILE): record it; connect_all opens no more */
        if (!g.fd_errno) g.fd_errno = errno;
        if (st.on) { storm_retry(c, now_ns()); return; }
        c->state = S_FAILED; g.failed++; g.failed_fd++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (c->kind == K_SLOW) {
        /* must be set before connect so the advertised window stays tiny */
        int rb = 4096;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rb, sizeof rb);
    }
    c->fd = fd;
    c->attempts++;
    c->state = S_CONNECTING;
    c->welcomed = 0;
    c->in_len = 0; c->out_len = c->out_off = 0;
    int bad = 0;
    if (cfg.src_addrs > 0) {
        /* one of N loopback source addresses: each has its own ephemeral ports.
           NO_PORT: the port is picked at connect(), per (source, destination) */
        struct sockaddr_in src = { .sin_family = AF_INET };
        src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)((c - conns) % cfg.src_addrs));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        bad = bind(fd, (struct sockaddr *)&src, sizeof src) < 0;
    }
    if (bad || (connect(fd, (struct sockaddr *)&srv, sizeof srv) < 0 && errno != EINPROGRESS)) {
        close(fd); c->fd = -1;
        if (st.on) { st.failed_attempts++; storm_retry(c, now_ns()); return; }
        c->state = S_FAILED; g.failed++;
        return;
    }
    /* request: the Sec-WebSocket-Key only needs to be 16 base64'd bytes */
    unsigned char key[16]; char k64[25];
    for (int i = 0; i < 16; i++) key[i] = xrand() & 0xff;
    int j = 0;
    for (int i = 0; i < 15; i += 3) {
        uint32_t v = key[i] << 16 | key[i + 1] << 8 | key[i + 2];
        k64[j++] = b64[v >> 18]; k64[j++] = b64[(v >> 12) & 63];
        k64[j++] = b64[(v >> 6) & 63]; k64[j++] = b64[v & 63];
    }
    k64[j++] = b64[key[15] >> 2]; k64[j++] = b64[(key[15] & 3) << 4];
    k64[j++] = '='; k64[j++] = '='; k64[j] = 0;
    char path[512], req[1024];
    if (st.on) storm_path(c, path, sizeof path);
    else if (c->kind == K_PUB) snprintf(path, sizeof path, "%s", cfg.pub_path);
    else if (rm.open_members) snprintf(path, sizeof path, cfg.room_path, c->room, (int)(c - conns) % cfg.members);
    else snprintf(path, sizeof path, cfg.sub_path, (int)(c - conns));
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", path, cfg.port, k64);
    out_append(c, req, (size_t)n);
    ep_set(c, EPOLLOUT | EPOLLIN, EPOLL_CTL_ADD);
    g.inflight_hs++;
}

static void hs_failed(conn_t *c, uint64_t t)
{
    g.inflight_hs--;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd); c->fd = -1;
    /* storm: refused while the server restarts, or any other failure: back off, try again */
    if (st.on) { st.failed_attempts++; storm_retry(c, t); return; }
    /* Transient refusals (backlog overrun) get a few retries, started from
       connect_all: events of the old socket may still be in this batch. */
    if (c->http_status == 0 && c->attempts < 3) { c->state = S_IDLE; g.retry[g.retry_n++] = (int)(c - conns); return; }
    c->state = S_FAILED; g.failed++;
    (void)t;
}

static void process_frames(conn_t *c, char *buf, size_t len, size_t *consumed, uint64_t t);

static void save_leftover(conn_t *c, const char *p, size_t n)
{
    if (n > c->in_cap) {
        size_t cap = c->in_cap ? c->in_cap : 256;
        while (cap < n) cap *= 2;
        c->in = realloc(c->in, cap);
        if (!c->in) die("realloc");
        c->in_cap = (uint32_t)cap;
    }
    if (n) memcpy(c->in, p, n);
    c->in_len = (uint32_t)n;
}

static void on_handshake_readable(conn_t *c, uint64_t t)
{
    char buf[8192];
    if (c->in_len) memcpy(buf, c->in, c->in_len);
    size_t have = c->in_len;
    ssize_t r = read(c->fd, buf + have, sizeof buf - have - 1);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        hs_failed(c, t);
        return;
    }
    have += (size_t)r;
    buf[have] = 0;
    char *end = memmem(buf, have, "\r\n\r\n", 4);
    if (!end) {
        if (have >= sizeof buf - 1) { c->http_status = -1; hs_failed(c, t); return; }
        save_leftover(c, buf, have);
        return;
    }
    int status = 0;
    sscanf(buf, "HTTP/1.%*d %d", &status);
    if (status != 101) { c->http_status = status ? status : -1; hs_failed(c, t); return; }
    g.inflight_hs--;
    g.connected++;
    c->state = S_OPEN;
    c->join_ns = t;
    g.last_join_ns = t;
    if (cfg.welcome) g.awaiting_welcome++;
    if (c->kind == K_SUB) g.open_subs++;
    if (rm.open_members) rm.open_members[c->room]++;
    c->in_len = 0;
    /* slow clients stop reading here; only a hang-up is watched for */
    ep_set(c, c->kind == K_SLOW ? EPOLLRDHUP : EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
    /* frames that arrived with the 101 (e.g. a welcome) are processed now */
    size_t rest = have - (size_t)(end + 4 - buf);
    if (rest && c->kind == K_SLOW) {
        save_leftover(c, end + 4, rest);   /* parsed if we ever read this client */
    } else if (rest) {
        size_t consumed = 0;
        process_frames(c, end + 4, rest, &consumed, t);
        if (c->state == S_OPEN) save_leftover(c, end + 4 + consumed, rest - consumed);
    }
}

/* ------------------------------------------------------------------ */
/* frames                                                              */

static void lat_push(uint64_t v)
{
    if (g.lat_n == g.lat_cap) {
        if (g.lat_cap >= (1u << 25)) return; /* 32M samples is plenty */
        g.lat_cap = g.lat_cap ? g.lat_cap * 2 : (1u << 20);
        g.lat = realloc(g.lat, g.lat_cap * sizeof *g.lat);
        if (!g.lat) die("realloc");
    }
    g.lat[g.lat_n++] = v;
}

static void seq_complete(uint32_t seq);

static void storm_frame(conn_t *c, const char *p, size_t n, uint64_t t);

static void on_data(conn_t *c, const char *p, size_t n, uint64_t t)
{
    if (cfg.welcome && !c->welcomed && memmem(p, n, cfg.welcome, strlen(cfg.welcome))) {
        c->welcomed = 1;
        g.welcomed++; g.awaiting_welcome--;
        g.last_welcome_ns = t;
    }
    if (st.on) { storm_frame(c, p, n, t); return; }
    c->frames++;
    if (c->kind != K_SUB) return;       /* publisher: drained, not counted */
    const char *m = memmem(p, n, "BENCH:", 6);
    if (!m) {
        if (cfg.presence && memmem(p, n, cfg.presence, strlen(cfg.presence))) {
            c->pres_frames++; c->pres_bytes += n;
            g.pres_frames++; g.pres_bytes += n;
            g.last_presence_ns = t;
        } else if (cfg.error && memmem(p, n, cfg.error, strlen(cfg.error))) {
            g.error_frames++;
        }
        return;
    }
    /* parse "BENCH:<seq>:<ns>:" without trusting the rest of the frame */
    const char *e = p + n;
    m += 6;
    uint64_t seq = 0, ts = 0;
    while (m < e && *m >= '0' && *m <= '9') seq = seq * 10 + (uint64_t)(*m++ - '0');
    if (m >= e || *m != ':') return;
    m++;
    while (m < e && *m >= '0' && *m <= '9') ts = ts * 10 + (uint64_t)(*m++ - '0');
    c->delivered++;
    g.deliveries++;
    if (g.window) g.win_deliveries++;
    if (rm.open_members) {
        /* rooms: the window's messages, also when they arrive while draining */
        if (seq >= rm.win_first_seq) { rm.win_delivered++; lat_push(t > ts ? t - ts : 0); }
        return;
    }
    if (g.window && seq >= g.win_first_seq) lat_push(t > ts ? t - ts : 0);
    if (pub.count && seq < pub.max_msgs) {
        if (++pub.count[seq] == pub.target[seq]) seq_complete((uint32_t)seq);
    }
}

static void on_control(conn_t *c, int op, const char *p, size_t n, uint64_t t)
{
    if (op == 0x9) {                 /* ping -> pong with the same payload */
        ws_frame(c, 0xA, p, n);
        flush_out(c, t);
    } else if (op == 0x8) {          /* close: record the code, answer, hang up */
        c->close_code = n >= 2 ? ((unsigned char)p[0] << 8 | (unsigned char)p[1]) : 1005;
        ws_frame(c, 0x8, p, n >= 2 ? 2 : 0);
        flush_out(c, t);
        conn_close(c, t);
    }
    /* pong (0xA): nothing to do */
}

/* Parse as many complete frames as buf holds. */
static void process_frames(conn_t *c, char *buf, size_t len, size_t *consumed, uint64_t t)
{
    size_t p = 0;
    while (len - p >= 2 && c->state == S_OPEN) {
        unsigned char b0 = (unsigned char)buf[p], b1 = (unsigned char)buf[p + 1];
        int op = b0 & 0x0f;
        int masked = b1 & 0x80;
        uint64_t plen = b1 & 0x7f;
        size_t hl = 2;
        if (plen == 126) {
            if (len - p < 4) break;
            plen = (uint64_t)(unsigned char)buf[p + 2] << 8 | (unsigned char)buf[p + 3];
            hl = 4;
        } else if (plen == 127) {
            if (len - p < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = plen << 8 | (unsigned char)buf[p + 2 + i];
            hl = 10;
        }
        if (masked) hl += 4;
        if (plen > (1ull << 30)) {   /* nothing here sends 1 GiB frames: we lost sync */
            g.protocol_errors++;
            c->eof = 1;
            conn_close(c, t);
            break;
        }
        if (len - p < hl + plen) { frame_need = hl + (size_t)plen; break; }
        char *pl = buf + p + hl;
        if (masked) {  /* servers must not mask, but be lenient */
            unsigned char *k = (unsigned char *)buf + p + hl - 4;
            for (uint64_t i = 0; i < plen; i++) pl[i] ^= k[i & 3];
        }
        if (op >= 0x8) on_control(c, op, pl, (size_t)plen, t);
        else on_data(c, pl, (size_t)plen, t);
        p += hl + plen;
    }
    *consumed = p;
}

/* Read what the socket has.  A partial frame left from the previous read is
   copied to the front of the shared buffer, so frames are always parsed
   from one contiguous block. */
static void on_readable(conn_t *c, uint64_t t)
{
    size_t need = 0;   /* length of the partial frame we hold, if known */
    for (;;) {
        size_t have = c->in_len;
        size_t want = (need > have ? need : have) + 65536;
        if (want > scratch_cap) {
            while (want > scratch_cap) scratch_cap *= 2;
            scratch = realloc(scratch, scratch_cap);
            if (!scratch) die("realloc");
        }
        if (have) memcpy(scratch, c->in, have);
        size_t room = scratch_cap - have;
        ssize_t r = read(c->fd, scratch + have, room);
        if (r == 0) { c->eof = 1; conn_close(c, t); return; }
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            c->eof = 1; conn_close(c, t); return;
        }
        have += (size_t)r;
        size_t consumed = 0;
        frame_need = 0;
        process_frames(c, scratch, have, &consumed, t);
        if (c->state != S_OPEN) return;
        need = frame_need;
        save_leftover(c, scratch + consumed, have - consumed);
        if ((size_t)r < room) return;   /* socket drained for now */
    }
}

static void handle_event(conn_t *c, uint32_t ev, uint64_t t)
{
    switch (c->state) {
    case S_CONNECTING:
        if (ev & (EPOLLERR | EPOLLHUP)) { hs_failed(c, t); return; }
        if (ev & EPOLLOUT) {
            int err = 0; socklen_t sl = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl);
            if (err) { hs_failed(c, t); return; }
            c->state = S_HS;
            /* (conn_close counted the handshake out; storm mode has scheduled a retry) */
            if (flush_out(c, t) < 0) { if (c->state == S_CLOSED) { c->state = S_FAILED; g.failed++; } return; }
        }
        if (ev & EPOLLIN) on_handshake_readable(c, t);
        return;
    case S_HS:
        if (ev & EPOLLOUT) flush_out(c, t);
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_handshake_readable(c, t);
        return;
    case S_OPEN:
        if (c->kind == K_SLOW && !c->slow_reading) {
            /* not reading: a hang-up or reset means the server dropped us */
            if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) { c->eof = 1; conn_close(c, t); }
            return;
        }
        if (ev & EPOLLOUT) { if (flush_out(c, t) < 0) return; }
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) on_readable(c, t);
        return;
    default:
        return;
    }
}

/* ------------------------------------------------------------------ */
/* publisher                                                           */

static void pub_send_one(uint64_t t)
{
    uint32_t seq = pub.sent;
    char msg[64];
    int n = snprintf(msg, sizeof msg, "BENCH:%u:%llu:", seq, (unsigned long long)t);
    size_t len = cfg.size > n ? (size_t)cfg.size : (size_t)n;
    static char *body; static size_t body_cap;
    if (len > body_cap) {
        body = realloc(body, len);
        if (!body) die("realloc");
        memset(body, 'x', len);   /* padding stays 'x' across calls */
        body_cap = len;
    }
    memcpy(body, msg, (size_t)n);
    pub.target[seq] = (uint32_t)g.open_subs;
    pub.sent_ns[seq] = t;
    pub.sent++;
    ws_frame(pub.c, 0x1, body, len);
    flush_out(pub.c, t);
}

static void seq_complete(uint32_t seq)
{
    (void)seq;
    pub.completed++;
    while (pub.oldest < pub.sent && pub.count[pub.oldest] >= pub.target[pub.oldest]) pub.oldest++;
}

/* Called after every batch of events. */
static void pub_tick(uint64_t t)
{
    if (!pub.active || !pub.c || pub.c->state != S_OPEN) return;
    if (t >= pub.stop_ns) { pub.active = 0; return; }
    if (pub.closed_loop) {
        /* a message that never completes (lost delivery, dropped subscriber)
           must not stall the loop forever: give up on it after 2 s */
        while (pub.oldest < pub.sent && t - pub.sent_ns[pub.oldest] > 2000000000ull) {
            if (pub.count[pub.oldest] < pub.target[pub.oldest]) { pub.timed_out++; pub.completed++; pub.target[pub.oldest] = 0; }
            pub.oldest++;
            while (pub.oldest < pub.sent && pub.count[pub.oldest] >= pub.target[pub.oldest]) pub.oldest++;
        }
        while (pub.sent - pub.completed < (uint32_t)cfg.inflight && pub.sent < pub.max_msgs)
            pub_send_one(t);
    } else {
        while (t >= pub.next_ns && pub.sent < pub.max_msgs) {
            pub_send_one(t);
            pub.next_ns += pub.interval_ns;
        }
    }
}

static void pub_init(conn_t *c, uint32_t max_msgs)
{
    pub.c = c;
    pub.max_msgs = max_msgs;
    pub.count = calloc(max_msgs, sizeof *pub.count);
    pub.target = calloc(max_msgs, sizeof *pub.target);
    pub.sent_ns = calloc(max_msgs, sizeof *pub.sent_ns);
    if (!pub.count || !pub.target || !pub.sent_ns) die("calloc");
}

/* ------------------------------------------------------------------ */
/* rooms: every member posts                                           */

static int cmp_phase(const void *a, const void *b)
{
    uint64_t x = rm.phase_ns[*(const int *)a], y = rm.phase_ns[*(const int *)b];
    return x < y ? -1 : x > y;
}

/* Draw every member's phase (uniform in [0, interval)) and sort the members by it. */
static void rooms_schedule(uint64_t start_ns, double seconds)
{
    rm.interval_ns = (uint64_t)(cfg.interval * 1e9);
    rm.order = malloc((size_t)nconns * sizeof *rm.order);
    uint64_t *phase = malloc((size_t)nconns * sizeof *phase);
    rm.phase_ns = malloc((size_t)nconns * sizeof *rm.phase_ns);
    if (!rm.order || !phase || !rm.phase_ns) die("malloc");
    for (int i = 0; i < nconns; i++) {
        rm.order[i] = i;
        rm.phase_ns[i] = (uint64_t)((double)xrand() / 4294967296.0 * (double)rm.interval_ns);
    }
    qsort(rm.order, (size_t)nconns, sizeof *rm.order, cmp_phase);
    for (int i = 0; i < nconns; i++) phase[i] = rm.phase_ns[rm.order[i]];
    free(rm.phase_ns);
    rm.phase_ns = phase;   /* now indexed like order */
    rm.next = 0;
    rm.round_ns = start_ns;
    rm.stop_ns = start_ns + (uint64_t)(seconds * 1e9);
    rm.active = 1;
}

static void room_send(conn_t *c)
{
    if (c->state != S_OPEN) { rm.skipped++; return; }
    uint64_t t = now_ns(), seq = rm.sent++;
    char msg[64];
    int n = snprintf(msg, sizeof msg, "BENCH:%llu:%llu:", (unsigned long long)seq, (unsigned long long)t);
    /* every member open right now should get it, the sender included */
    if (seq >= rm.win_first_seq) { rm.win_msgs++; rm.win_expected += (uint64_t)rm.open_members[c->room]; }
    ws_frame(c, 0x1, msg, (size_t)n);
    flush_out(c, t);
}

/* Called after every batch of events: send whatever is due. */
static void rooms_tick(uint64_t t)
{
    while (rm.active) {
        if (t >= rm.stop_ns) { rm.active = 0; break; }
        uint64_t due = rm.round_ns + rm.phase_ns[rm.next];
        if (due > t || due >= rm.stop_ns) break;
        room_send(&conns[rm.order[rm.next]]);
        if (++rm.next == nconns) { rm.next = 0; rm.round_ns += rm.interval_ns; }
    }
}

/* ------------------------------------------------------------------ */
/* storm: reconnect with backoff, resume, track every message           */

/* The unsigned integer after `key` (e.g. "\"id\":") in a JSON frame, or -1.
   Enough for the server's own frames: the key's first occurrence is the field
   (a quote inside a string value would be escaped). */
static int64_t json_uint(const char *p, size_t n, const char *key)
{
    size_t kl = strlen(key);
    const char *m = memmem(p, n, key, kl), *e = p + n;
    if (!m) return -1;
    m += kl;
    while (m < e && *m == ' ') m++;
    if (m >= e || *m < '0' || *m > '9') return -1;
    int64_t v = 0;
    while (m < e && *m >= '0' && *m <= '9') v = v * 10 + (*m++ - '0');
    return v;
}

/* The string after `key`, up to its closing quote, if it is short and plain. */
static int json_str(const char *p, size_t n, const char *key, char *out, size_t cap)
{
    size_t kl = strlen(key), k = 0;
    const char *m = memmem(p, n, key, kl), *e = p + n;
    if (!m) return -1;
    m += kl;
    while (m < e && *m == ' ') m++;
    if (m >= e || *m++ != '"') return -1;
    while (m < e && *m != '"') {
        char ch = *m++;
        int plain = (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    ch == '-' || ch == '_';
        if (!plain || k + 1 >= cap) return -1;   /* it goes into a URL as it is */
        out[k++] = ch;
    }
    out[k] = 0;
    return m < e ? 0 : -1;
}

static void heap_swap(int a, int b) { int x = st.heap[a]; st.heap[a] = st.heap[b]; st.heap[b] = x; }

static void heap_push(int i, uint64_t due)
{
    st.due[i] = due;
    int k = st.heap_n++;
    st.heap[k] = i;
    while (k && st.due[st.heap[(k - 1) / 2]] > st.due[st.heap[k]]) { heap_swap(k, (k - 1) / 2); k = (k - 1) / 2; }
}

static int heap_pop(void)
{
    int top = st.heap[0];
    st.heap[0] = st.heap[--st.heap_n];
    for (int k = 0;;) {
        int l = 2 * k + 1, r = l + 1, m = k;
        if (l < st.heap_n && st.due[st.heap[l]] < st.due[st.heap[m]]) m = l;
        if (r < st.heap_n && st.due[st.heap[r]] < st.due[st.heap[m]]) m = r;
        if (m == k) break;
        heap_swap(k, m); k = m;
    }
    return top;
}

/* Try again after backoff_min doubling per failed attempt up to backoff_max,
   times a random factor in [0.5, 1) (jitter: the clients do not come back in step). */
static void storm_retry(conn_t *c, uint64_t t)
{
    int i = (int)(c - conns);
    sconn_t *s = &st.sc[i];
    double d = cfg.backoff_min * (double)(1u << (s->fails < 16 ? s->fails : 16));
    if (d > cfg.backoff_max) d = cfg.backoff_max;
    d *= 0.5 + 0.5 * (double)xrand() / 4294967296.0;
    if (s->fails < 255) s->fails++;
    c->state = S_IDLE;
    if (st.finishing) return;
    heap_push(i, t + (uint64_t)(d * 1e9));
}

/* A connection ended (closed by the server, reset, or died mid-handshake). */
static void storm_lost(conn_t *c, int was_open, uint64_t t)
{
    sconn_t *s = &st.sc[c - conns];
    if (s->up) { s->up = 0; st.up--; }
    if (was_open) {
        if (!st.first_close_ns) st.first_close_ns = t;
        if (c->close_code == 1012) st.closes_1012++;
        else if (c->close_code == 1001) st.closes_1001++;
        else if (c->close_code >= 0) st.closes_other++;
        else st.closes_eof++;
        c->close_code = -1;
    } else {
        st.failed_attempts++;
    }
    storm_retry(c, t);
}

/* The URL of connection c: the room's (publisher or member) plus since=&epoch= once
   it has been welcomed: the last message id it received, in the epoch it was in. */
static size_t storm_path(conn_t *c, char *path, size_t cap)
{
    int i = (int)(c - conns);
    sconn_t *s = &st.sc[i];
    int n;
    if (c->kind == K_PUB) n = snprintf(path, cap, cfg.pub_path, c->room);
    else n = snprintf(path, cap, cfg.room_path, c->room, (i - st.npubs) % cfg.members);
    s->resumed = s->epoch[0] != 0;
    s->since = s->last_id;
    if (s->resumed)
        n += snprintf(path + n, cap - (size_t)n, "%csince=%llu&epoch=%s", strchr(path, '?') ? '&' : '?',
                      (unsigned long long)s->last_id, s->epoch);
    st.attempts += st.term_ns != 0;
    return (size_t)n;
}

static void storm_welcome(conn_t *c, sconn_t *s, const char *p, size_t n, uint64_t t)
{
    char epoch[sizeof s->epoch];
    if (json_str(p, n, "\"epoch\":", epoch, sizeof epoch) < 0) epoch[0] = 0;
    int64_t last = json_uint(p, n, "\"last_id\":");
    int recovered = memmem(p, n, "\"recovered\":true", 16) ? 1 : memmem(p, n, "\"recovered\":false", 17) ? 0 : -1;
    if (s->epoch[0] && strcmp(s->epoch, epoch)) { s->last_id = 0; st.epoch_changes++; }  /* a new sequence */
    memcpy(s->epoch, epoch, sizeof epoch);
    s->welcome_last_id = last > 0 ? (uint64_t)last : 0;
    if (s->resumed) {
        if (recovered < 0) st.no_answer++;
        else if (c->kind == K_PUB) { if (recovered) st.pub_recovered++; else st.pub_gap++; }
        else if (recovered) st.sub_recovered++;
        else st.sub_gap++;
    }
    s->up = 1; s->fails = 0;
    st.up++;
    g.last_welcome_ns = t;
    if (st.term_ns && t > st.term_ns) {
        if (!st.first_welcome_ns) st.first_welcome_ns = t;
        if (c->kind == K_SUB && !s->back) {
            s->back = 1;
            if (++st.back == st.nsubs) {
                st.all_back_ns = t;
                st.cpu_back_us = server_cpu_us();
                st.lg_cpu_back_us = self_cpu_us();
            }
        }
    }
}

/* Every frame of a storm connection: welcome, message (its id, its marker), other. */
static void storm_frame(conn_t *c, const char *p, size_t n, uint64_t t)
{
    c->frames++;
    sconn_t *s = &st.sc[c - conns];
    if (!s->up && memmem(p, n, "\"type\":\"welcome\"", 16)) { storm_welcome(c, s, p, n, t); return; }
    if (!memmem(p, n, "\"type\":\"message\"", 16)) {
        if (cfg.presence && memmem(p, n, cfg.presence, strlen(cfg.presence))) {
            g.pres_frames++; g.pres_bytes += n; g.last_presence_ns = t;
        } else if (cfg.error && memmem(p, n, cfg.error, strlen(cfg.error))) {
            g.error_frames++;
        }
        return;
    }
    int64_t id = json_uint(p, n, "\"id\":");
    int replay = s->resumed && id >= 0 && (uint64_t)id <= s->welcome_last_id;
    if (id > 0 && (uint64_t)id > s->last_id) s->last_id = (uint64_t)id;
    if (replay) st.replayed++;
    const char *m = memmem(p, n, "BENCH:", 6), *e = p + n;
    if (!m) return;
    uint64_t k = 0;
    for (m += 6; m < e && *m >= '0' && *m <= '9'; m++) k = k * 10 + (uint64_t)(*m - '0');
    if (k >= st.max_slots || (int)(k % (uint64_t)st.npubs) != c->room || !st.sent_ns[k]) { st.wrong_room++; return; }
    if (c->kind == K_PUB) {
        if (st.acked[k]) return;
        st.acked[k] = replay ? 2 : 1;
        st.msg_id[k] = id > 0 ? (uint32_t)id : 0;
        if (replay) return;   /* acknowledged by the resume, not a round trip */
        uint64_t sent = st.sent_ns[k], rtt = t > sent ? t - sent : 0;
        if (st.term_ns && sent >= st.term_ns) st.rtt_storm.v[st.rtt_storm.n++] = rtt;
        else if (sent >= st.before_ns) st.rtt_before.v[st.rtt_before.n++] = rtt;
        return;
    }
    uint64_t bit = k / (uint64_t)st.npubs;   /* the room's own message number */
    uint64_t *w = &st.seen[(size_t)(c - conns - st.npubs) * (size_t)st.seen_words + bit / 64];
    if (*w & (1ull << (bit % 64))) { st.dups++; return; }
    *w |= 1ull << (bit % 64);
    st.got[k]++;
    c->delivered++;
    g.deliveries++;
}

/* Send whatever the schedule has due; a room whose publisher connection is down skips its turn. */
static void storm_publish(uint64_t t)
{
    while (st.pub_active) {
        if (t >= st.pub_stop_ns || st.next_slot >= st.max_slots) { st.pub_active = 0; break; }
        uint64_t due = st.pub_start_ns + (uint64_t)((double)st.next_slot * 1e9 / cfg.rate);
        if (due > t) break;
        uint32_t k = st.next_slot++;
        conn_t *c = &conns[k % (uint32_t)st.npubs];
        if (c->state != S_OPEN || !st.sc[k % (uint32_t)st.npubs].up) { st.skipped++; continue; }
        uint64_t now = now_ns();
        char msg[64];
        int n = snprintf(msg, sizeof msg, "BENCH:%u:%llu:", k, (unsigned long long)now);
        st.sent_ns[k] = now;
        ws_frame(c, 0x1, msg, (size_t)n);
        flush_out(c, now);
    }
}

/* After every batch of events: reconnect whatever is due (within the handshake bound), publish. */
static void storm_tick(uint64_t t)
{
    while (st.heap_n && st.due[st.heap[0]] <= t && g.inflight_hs < cfg.concurrency)
        start_connect(&conns[heap_pop()]);
    storm_publish(t);
}

#define STDIN_TAG 0xffffffffu

/* run.py's lines on stdin: "term <ns>" (SIGTERM sent), "pid <pid> <ns>" (the new server answers /healthz). */
static void storm_stdin(void)
{
    static char buf[256];
    static size_t have;
    ssize_t r = read(0, buf + have, sizeof buf - 1 - have);
    if (r <= 0) { epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL); return; }   /* run.py is gone */
    have += (size_t)r;
    buf[have] = 0;
    char *line = buf, *nl;
    while ((nl = strchr(line, '\n'))) {
        *nl = 0;
        unsigned long long ns = 0;
        int pid = 0;
        if (sscanf(line, "term %llu", &ns) == 1) {
            st.term_ns = ns;
            st.lg_cpu_term_us = self_cpu_us();
        } else if (sscanf(line, "pid %d %llu", &pid, &ns) == 2) {
            cfg.server_pid = pid;
            st.ready_ns = ns;
            st.cpu_ready_us = server_cpu_us();   /* the new process: its start-up so far */
        }
        line = nl + 1;
    }
    have = strlen(line);
    memmove(buf, line, have + 1);
}

static void storm_init(void)
{
    st.on = 1;
    st.npubs = cfg.rooms;
    st.nsubs = cfg.rooms * cfg.members;
    st.sc = calloc((size_t)nconns, sizeof *st.sc);
    st.heap = malloc((size_t)nconns * sizeof *st.heap);
    st.due = malloc((size_t)nconns * sizeof *st.due);
    /* every slot the run can reach: warm-up, before, the storm's limit, the tail */
    st.max_slots = (uint32_t)(cfg.rate * (cfg.warmup + cfg.duration + cfg.storm_timeout + cfg.tail + 5)) + 2;
    st.sent_ns = calloc(st.max_slots, sizeof *st.sent_ns);
    st.acked = calloc(st.max_slots, 1);
    st.msg_id = calloc(st.max_slots, sizeof *st.msg_id);
    st.got = calloc(st.max_slots, sizeof *st.got);
    st.seen_words = (int)((st.max_slots / (uint32_t)st.npubs + 1 + 63) / 64);
    st.seen = calloc((size_t)st.nsubs * (size_t)st.seen_words, sizeof *st.seen);
    st.rtt_before.v = malloc(st.max_slots * sizeof(uint64_t));
    st.rtt_storm.v = malloc(st.max_slots * sizeof(uint64_t));
    if (!st.sc || !st.heap || !st.due || !st.sent_ns || !st.acked || !st.msg_id || !st.got || !st.seen ||
        !st.rtt_before.v || !st.rtt_storm.v)
        die("calloc");
    for (int i = 0; i < nconns; i++) {
        conns[i].kind = i < st.npubs ? K_PUB : K_SUB;
        conns[i].room = i < st.npubs ? i : (i - st.npubs) / cfg.members;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = STDIN_TAG };
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) die("epoll_ctl stdin");
}


/* ------------------------------------------------------------------ */
/* event loop                                                          */

static void pump(int timeout_ms)
{
    static struct epoll_event ev[1024];
    if (pub.active && !pub.closed_loop && pub.sent < pub.max_msgs) {
        uint64_t t = now_ns();
        int64_t until = (int64_t)(pub.next_ns - t);
        int ms = until <= 0 ? 0 : (int)(until / 1000000);
        if (ms < timeout_ms) timeout_ms = ms;
    }
    if (rm.active) {
        /* the next post is usually well under 1 ms away: round up, or the
           loop would spin on a 0 ms timeout (the stamp is the real send time) */
        int64_t until = (int64_t)(rm.round_ns + rm.phase_ns[rm.next] - now_ns());
        int ms = until <= 0 ? 0 : (int)((until + 999999) / 1000000);
        if (ms < timeout_ms) timeout_ms = ms;
    }
    if (st.on) {
        /* the next post or reconnect, rounded up like the rooms' schedule */
        uint64_t t = now_ns(), next = UINT64_MAX;
        if (st.pub_active) next = st.pub_start_ns + (uint64_t)((double)st.next_slot * 1e9 / cfg.rate);
        if (st.heap_n && g.inflight_hs < cfg.concurrency && st.due[st.heap[0]] < next) next = st.due[st.heap[0]];
        if (next != UINT64_MAX) {
            int ms = next <= t ? 0 : (int)((next - t + 999999) / 1000000);
            if (ms < timeout_ms) timeout_ms = ms;
        }
    }
    int n = epoll_wait(epfd, ev, 1024, timeout_ms);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    /* a timestamp per event, not per batch: handling 1,024 events takes long
       enough to skew latencies otherwise (vDSO clock reads are cheap) */
    for (int i = 0; i < n; i++) {
        if (ev[i].data.u32 == STDIN_TAG) { storm_stdin(); continue; }
        handle_event(&conns[ev[i].data.u32], ev[i].events, now_ns());
    }
    pub_tick(now_ns());
    if (rm.active) rooms_tick(now_ns());
    if (st.on) storm_tick(now_ns());
}

/* Open every connection, at most cfg.concurrency handshakes in flight. */
static double connect_all(void)
{
    uint64_t t0 = now_ns();
    uint64_t deadline = t0 + (uint64_t)(cfg.connect_timeout * 1e9);
    /* with --welcome, a connection is joined once its welcome arrived */
    while ((g.connected + g.failed < nconns || g.awaiting_welcome > 0) && now_ns() < deadline) {
        if (g.fd_errno && g.inflight_hs == 0 && g.awaiting_welcome == 0) break;  /* out of descriptors */
        uint64_t t = now_ns(), last = g.last_welcome_ns > g.last_join_ns ? g.last_welcome_ns : g.last_join_ns;
        if (cfg.stall > 0 && t - (last > t0 ? last : t0) > (uint64_t)(cfg.stall * 1e9)) { g.stalled = 1; break; }
        while (g.inflight_hs < cfg.concurrency && g.retry_n && !g.fd_errno)
            start_connect(&conns[g.retry[--g.retry_n]]);
        while (g.inflight_hs < cfg.concurrency && g.next_to_connect < nconns && !g.fd_errno)
            start_connect(&conns[g.next_to_connect++]);
        pump(50);
    }
    uint64_t last = g.last_welcome_ns > g.last_join_ns ? g.last_welcome_ns : g.last_join_ns;
    return (double)(last > t0 ? last - t0 : 0) / 1e9;
}

/* storm: open every connection, until each has been welcomed (failures back off and retry) */
static double storm_connect_all(void)
{
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(cfg.connect_timeout * 1e9);
    while (st.up < nconns && now_ns() < deadline) {
        while (g.inflight_hs < cfg.concurrency && g.next_to_connect < nconns)
            start_connect(&conns[g.next_to_connect++]);
        pump(50);
    }
    return (double)(g.last_welcome_ns > t0 ? g.last_welcome_ns - t0 : 0) / 1e9;
}

/* Keep reading until nothing presence-like arrived for `quiet` seconds. */
static void settle(double quiet, double max)
{
    uint64_t t0 = now_ns(), q = (uint64_t)(quiet * 1e9);
    uint64_t end = t0 + (uint64_t)(max * 1e9);
    g.last_presence_ns = t0;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= end) break;
        uint64_t last = g.last_presence_ns > g.last_join_ns ? g.last_presence_ns : g.last_join_ns;
        if (t - last >= q && t - t0 >= q) break;
        pump(20);
    }
}

static void run_for(double seconds)
{
    uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
    while (now_ns() < end) pump(10);
}

/* ------------------------------------------------------------------ */
/* reporting                                                           */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void print_latency(void)
{
    if (!g.lat_n) { printf(",\"lat_samples\":0,\"p50_ms\":null,\"p99_ms\":null,\"max_ms\":null"); return; }
    qsort(g.lat, g.lat_n, sizeof *g.lat, cmp_u64);
    printf(",\"lat_samples\":%zu,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f", g.lat_n,
           g.lat[(g.lat_n - 1) / 2] / 1e6, g.lat[(size_t)((g.lat_n - 1) * 0.99)] / 1e6,
           g.lat[g.lat_n - 1] / 1e6);
}

static void print_lat(const char *name, lat_t *l)
{
    if (!l->n) { printf(",\"%s_samples\":0,\"%s_p50_ms\":null,\"%s_p99_ms\":null,\"%s_max_ms\":null",
                        name, name, name, name); return; }
    qsort(l->v, l->n, sizeof *l->v, cmp_u64);
    printf(",\"%s_samples\":%zu,\"%s_p50_ms\":%.3f,\"%s_p99_ms\":%.3f,\"%s_max_ms\":%.3f", name, l->n,
           name, l->v[(l->n - 1) / 2] / 1e6, name, l->v[(size_t)((l->n - 1) * 0.99)] / 1e6, name, l->v[l->n - 1] / 1e6);
}

static void print_common(void)
{
    int subs_closed = 0, failed_status[4] = { 0 };
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->kind == K_SUB && c->state == S_CLOSED) subs_closed++;
        if (c->state == S_FAILED) {
            if (c->http_status == 0) failed_status[0]++;
            else if (c->http_status >= 400 && c->http_status < 500) failed_status[1]++;
            else if (c->http_status >= 500) failed_status[2]++;
            else failed_status[3]++;
        }
    }
    printf("\"welcomed\":%d,\"connect_failed_no_fd\":%d,\"fd_error\":%s%s%s,\"connect_stalled\":%s,"
           "\"not_attempted\":%d,",
           g.welcomed, g.failed_fd, g.fd_errno ? "\"" : "", g.fd_errno ? strerror(g.fd_errno) : "null",
           g.fd_errno ? "\"" : "", g.stalled ? "true" : "false", nconns - g.next_to_connect);
    printf("\"mode\":\"%s\",\"conns\":%d,\"connected\":%d,\"connect_failed\":%d,"
           "\"connect_failed_tcp\":%d,\"connect_failed_4xx\":%d,\"connect_failed_5xx\":%d,"
           "\"connect_failed_other\":%d,\"subs_closed_by_server\":%d,"
           "\"closes_during_window\":%d,\"protocol_errors\":%d,\"error_frames\":%llu,"
           "\"handshakes_unfinished\":%d",
           cfg.mode, nconns, g.connected, g.failed, failed_status[0], failed_status[1],
           failed_status[2], failed_status[3], subs_closed, g.closes_during_run, g.protocol_errors,
           (unsigned long long)g.error_frames,
           nconns > g.connected + g.failed ? nconns - g.connected - g.failed : 0);  /* storm: reconnects count too */
    /* close codes seen by subscribers (first few distinct) */
    int codes[8], ncodes = 0, counts[8] = { 0 };
    for (int i = 0; i < nconns; i++) {
        int cc = conns[i].close_code;
        if (cc < 0) continue;
        int k = 0;
        while (k < ncodes && codes[k] != cc) k++;
        if (k == ncodes) { if (ncodes == 8) continue; codes[ncodes++] = cc; }
        counts[k]++;
    }
    printf(",\"close_codes\":{");
    for (int k = 0; k < ncodes; k++) printf("%s\"%d\":%d", k ? "," : "", codes[k], counts[k]);
    printf("}");
}

/* ------------------------------------------------------------------ */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen --mode fanout|rate|slow|conns|join|rooms|storm --port P [--pid SERVER_PID]\n"
            "  --sub-path T (printf, %%d=index)  --pub-path PATH  --presence STR  --error-marker STR\n"
            "  --subs N --slow N --concurrency N --inflight N --size BYTES\n"
            "  --duration S --rate MSGS_PER_S --warmup S --drain S --tail S --hold\n"
            "  rooms: --rooms N --members M --interval S (between one member's posts)\n"
            "         --room-path T (printf, %%d=room, %%d=member; the second may be left out)\n"
            "  storm: --rooms N --members M --rate MSGS_PER_S (all rooms) --room-path T --pub-path T (%%d=room)\n"
            "         --warmup S --duration S (before) --tail S (after all are back) --drain S\n"
            "         --storm-timeout S --backoff-min S --backoff-max S; commands on stdin (see top)\n"
            "  --welcome STR (joined = welcomed)  --src-addrs N (127.0.0.2..)  --stall S (give up connecting)\n"
            "  --connect-timeout S\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && v && ++i)
        if (ARG("--mode")) cfg.mode = v;
        else if (ARG("--port")) cfg.port = atoi(v);
        else if (ARG("--pid")) cfg.server_pid = atoi(v);
        else if (ARG("--sub-path")) cfg.sub_path = v;
        else if (ARG("--pub-path")) cfg.pub_path = v;
        else if (ARG("--room-path")) cfg.room_path = v;
        else if (ARG("--presence")) cfg.presence = v;
        else if (ARG("--error-marker")) cfg.error = v;
        else if (ARG("--rooms")) cfg.rooms = atoi(v);
        else if (ARG("--members")) cfg.members = atoi(v);
        else if (ARG("--interval")) cfg.interval = atof(v);
        else if (ARG("--subs")) cfg.subs = atoi(v);
        else if (ARG("--slow")) cfg.slow = atoi(v);
        else if (ARG("--concurrency")) cfg.concurrency = atoi(v);
        else if (ARG("--inflight")) cfg.inflight = atoi(v);
        else if (ARG("--size")) cfg.size = atoi(v);
        else if (ARG("--duration")) cfg.duration = atof(v);
        else if (ARG("--rate")) cfg.rate = atof(v);
        else if (ARG("--warmup")) cfg.warmup = atof(v);
        else if (ARG("--drain")) cfg.drain = atof(v);
        else if (ARG("--tail")) cfg.tail = atof(v);
        else if (ARG("--connect-timeout")) cfg.connect_timeout = atof(v);
        else if (ARG("--welcome")) cfg.welcome = v;
        else if (ARG("--src-addrs")) cfg.src_addrs = atoi(v);
        else if (ARG("--stall")) cfg.stall = atof(v);
        else if (ARG("--storm-timeout")) cfg.storm_timeout = atof(v);
        else if (ARG("--backoff-min")) cfg.backoff_min = atof(v);
        else if (ARG("--backoff-max")) cfg.backoff_max = atof(v);
        else if (strcmp(a, "--hold") == 0) cfg.hold = 1;
        else usage();
#undef ARG
    }
    signal(SIGPIPE, SIG_IGN);
    xr ^= (uint32_t)now_ns() | 1;

    int mode_fanout = !strcmp(cfg.mode, "fanout"), mode_rate = !strcmp(cfg.mode, "rate"),
        mode_slow = !strcmp(cfg.mode, "slow"), mode_conns = !strcmp(cfg.mode, "conns"),
        mode_join = !strcmp(cfg.mode, "join"), mode_rooms = !strcmp(cfg.mode, "rooms"),
        mode_storm = !strcmp(cfg.mode, "storm");
    if (!(mode_fanout || mode_rate || mode_slow || mode_conns || mode_join || mode_rooms || mode_storm)) usage();
    int has_pub = mode_fanout || mode_rate || mode_slow;
    if (mode_rooms || mode_storm) {
        /* the template gets (room, member): allow at most two %d and nothing else */
        int nd = 0;
        for (const char *q = cfg.room_path; *q; q++) {
            if (*q != '%') continue;
            if (q[1] == '%') { q++; continue; }
            if (q[1] != 'd' || ++nd > 2) usage();
        }
        if (cfg.rooms < 1 || cfg.members < 1 || cfg.interval <= 0 || cfg.rate <= 0) usage();
    }
    if (cfg.src_addrs < 0 || cfg.src_addrs > 1 << 20) usage();

    nconns = mode_rooms ? cfg.rooms * cfg.members
           : mode_storm ? cfg.rooms * (cfg.members + 1)
                        : cfg.subs + (mode_slow ? cfg.slow : 0) + (has_pub ? 1 : 0);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < (rlim_t)nconns + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)nconns + 64 ? rl.rlim_max : (rlim_t)nconns + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);   /* reported: it bounds how many sockets we can hold */
    conns = calloc((size_t)nconns, sizeof *conns);
    g.retry = calloc((size_t)nconns, sizeof *g.retry);
    if (!conns || !g.retry) die("calloc");
    /* Connection order = join order.  The publisher joins first; slow
       clients are spread evenly among the subscribers so that neither
       "all first" nor "all last" in a server's member list is favoured. */
    /* (rooms and storm modes lay their connections out themselves, below and in
       storm_init; --subs means nothing there and may exceed nconns) */
    if (!mode_rooms && !mode_storm) {
        int k = 0;
        if (has_pub) conns[k++].kind = K_PUB;
        int nslow = mode_slow ? cfg.slow : 0, slow_done = 0;
        for (int i = 0; i < cfg.subs; i++) {
            if (nslow && slow_done < nslow && i == (slow_done * cfg.subs) / nslow + cfg.subs / (2 * nslow))
                conns[k++].kind = K_SLOW, slow_done++;
            conns[k++].kind = K_SUB;
        }
        while (slow_done < nslow) conns[k++].kind = K_SLOW, slow_done++;
    }
    for (int i = 0; i < nconns; i++) { conns[i].fd = -1; conns[i].close_code = -1; }
    if (mode_rooms) {
        /* rooms fill up one after the other: room i / members, member i % members */
        for (int i = 0; i < nconns; i++) { conns[i].kind = K_SUB; conns[i].room = i / cfg.members; }
        rm.open_members = calloc((size_t)cfg.rooms, sizeof *rm.open_members);
        if (!rm.open_members) die("calloc");
    }

    srv.sin_family = AF_INET;
    srv.sin_port = htons((uint16_t)cfg.port);
    srv.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    scratch = malloc(scratch_cap);
    if (!scratch) die("malloc");

    if (mode_storm) storm_init();

    long rss_before = server_rss_kb();
    /* the connect phase's CPU on both sides (conns mode: the cost of a connection) */
    double cs0 = server_cpu_us(), cl0 = self_cpu_us();
    uint64_t c0 = now_ns();
    double connect_s = mode_storm ? storm_connect_all() : connect_all();
    double cs1 = server_cpu_us(), cl1 = self_cpu_us(), cwall = (double)(now_ns() - c0) / 1e9;

    printf("{\"connect_s\":%.3f,\"connect_wall_s\":%.3f,\"connect_server_cpu_us\":%.0f,"
           "\"connect_loadgen_cpu_us\":%.0f,\"nofile_limit\":%llu", connect_s, cwall,
           cs0 >= 0 && cs1 >= 0 ? cs1 - cs0 : -1.0, cl1 - cl0, (unsigned long long)rl.rlim_cur);

    if (mode_fanout || mode_rate) {
        settle(1.0, cfg.settle_max);
        uint32_t max_msgs = mode_rate ? (uint32_t)(cfg.rate * (cfg.warmup + cfg.duration) + 2) : MAXSEQ;
        pub_init(&conns[0], max_msgs);
        uint64_t t = now_ns();
        pub.closed_loop = mode_fanout;
        pub.interval_ns = mode_rate ? (uint64_t)(1e9 / cfg.rate) : 0;
        pub.next_ns = t;
        pub.stop_ns = t + (uint64_t)((cfg.warmup + cfg.duration) * 1e9);
        pub.active = 1;
        uint32_t sent0 = 0;
        if (cfg.warmup > 0) run_for(cfg.warmup);
        /* the measured window: deliveries, latencies and CPU of both sides */
        sent0 = pub.sent;
        if (mode_rate) g.win_first_seq = sent0;
        double s0 = server_cpu_us(), l0 = self_cpu_us();
        uint64_t w0 = now_ns();
        g.window = 1;
        if (mode_fanout) run_for(cfg.duration);
        else {
            /* fixed rate: publish for `duration`, then let the last ones arrive */
            while (pub.active) pump(10);
            uint64_t end = now_ns() + (uint64_t)(cfg.tail * 1e9);
            for (;;) {
                uint64_t want = 0, got = 0;
                for (uint32_t s = sent0; s < pub.sent; s++) { want += pub.target[s]; got += pub.count[s]; }
                if (got >= want || now_ns() >= end) break;
                pump(10);
            }
        }
        g.window = 0;
        uint64_t w1 = now_ns();
        double s1 = server_cpu_us(), l1 = self_cpu_us();
        pub.active = 0;
        double win = (double)(w1 - w0) / 1e9;
        /* per message: how many of the messages sent in the window arrived */
        uint64_t expected = 0, delivered = 0;
        for (uint32_t s = sent0; s < pub.sent; s++) { expected += pub.target[s]; delivered += pub.count[s]; }
        printf(",\"subs\":%d,\"window_s\":%.3f,\"msgs_sent\":%u,\"msgs_timed_out\":%u,"
               "\"window_msgs_delivered\":%llu,"
               "\"deliveries\":%llu,\"expected\":%llu,\"deliveries_per_s\":%.1f,"
               "\"server_cpu_us\":%.0f,\"loadgen_cpu_us\":%.0f,"
               "\"server_cpu_us_per_delivery\":%.3f,\"loadgen_cpu_us_per_delivery\":%.3f,"
               "\"server_cpu_pct\":%.1f,\"loadgen_cpu_pct\":%.1f",
               g.open_subs, win, pub.sent - sent0, pub.timed_out, (unsigned long long)delivered,
               (unsigned long long)g.win_deliveries, (unsigned long long)expected,
               g.win_deliveries / win, s1 - s0, l1 - l0,
               g.win_deliveries ? (s1 - s0) / g.win_deliveries : 0,
               g.win_deliveries ? (l1 - l0) / g.win_deliveries : 0,
               (s1 - s0) / (win * 1e4), (l1 - l0) / (win * 1e4));
        print_latency();
    } else if (mode_slow) {
        settle(1.0, cfg.settle_max);
        uint32_t max_msgs = (uint32_t)(cfg.rate * cfg.duration + 0.5);
        pub_init(&conns[0], max_msgs);
        long rss_start = server_rss_kb(), rss_max = rss_start, rss_end;
        long samples[256]; int ns = 0;
        samples[ns++] = rss_start;
        uint64_t t = now_ns();
        pub.interval_ns = (uint64_t)(1e9 / cfg.rate);
        pub.next_ns = t;
        pub.stop_ns = t + (uint64_t)(cfg.duration * 1e9) + 1000000; /* let the last tick fire */
        pub.active = 1;
        g.window = 1;
        uint64_t next_sample = t + 1000000000ull;
        uint64_t hard_end = t + (uint64_t)((cfg.duration + cfg.drain) * 1e9);
        uint64_t stop_pub = t + (uint64_t)(cfg.duration * 1e9);
        for (;;) {
            uint64_t now = now_ns();
            if (now >= next_sample) {
                long r = server_rss_kb();
                if (r > rss_max) rss_max = r;
                if (ns < 256) samples[ns++] = r;
                next_sample += 1000000000ull;
            }
            if (now >= stop_pub && pub.active) {
                /* stop publishing; what the server has not read from the
                   publisher by now is reported (it cannot be un-sent
                   mid-frame, so it stays queued) */
                pub.active = 0;
                if (pub.c->state == S_OPEN) {
                    pub.bytes_dropped_unsent = pub.c->out_len - pub.c->out_off;
                }
            }
            if (now >= hard_end) break;
            if (!pub.active && g.deliveries >= (uint64_t)pub.sent * (uint64_t)cfg.subs) break;
            pump(10);
        }
        g.window = 0;
        rss_end = server_rss_kb();
        if (rss_end > rss_max) rss_max = rss_end;
        uint64_t delivered = g.deliveries;
        uint64_t expected = (uint64_t)max_msgs * (uint64_t)cfg.subs;
        /* messages the publisher could not even hand to the kernel */
        uint64_t unsent_msgs = pub.bytes_dropped_unsent / ((uint64_t)cfg.size + 14);
        int dropped_during = 0;
        for (int i = 0; i < nconns; i++)
            if (conns[i].kind == K_SLOW && conns[i].state == S_CLOSED) dropped_during++;
        /* Final check of the slow clients: read what is queued for them.  A
           close frame or EOF means the server dropped them; data that keeps
           flowing means it still serves them.  (Subscriber counts are frozen
           above; reading may un-stall a server, which no longer matters.) */
        for (int i = 0; i < nconns; i++) {
            conn_t *c = &conns[i];
            if (c->kind == K_SLOW && c->state == S_OPEN) {
                c->slow_reading = 1;
                ep_set(c, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
            }
        }
        uint64_t check_end = now_ns() + 3000000000ull;
        while (now_ns() < check_end) {
            int open_slow = 0;
            for (int i = 0; i < nconns; i++) if (conns[i].kind == K_SLOW && conns[i].state == S_OPEN) open_slow++;
            if (!open_slow) break;
            pump(20);
        }
        int dropped = 0;
        printf(",\"subs\":%d,\"slow\":%d,\"msg_size\":%d,\"msgs_planned\":%u,\"msgs_published\":%u,"
               "\"msgs_not_taken_by_server_at_stop\":%llu,\"expected\":%llu,\"delivered\":%llu,"
               "\"delivery_ratio\":%.4f,\"rss_start_kb\":%ld,\"rss_max_kb\":%ld,\"rss_end_kb\":%ld,"
               "\"rss_samples_kb\":[",
               cfg.subs, cfg.slow, cfg.size, max_msgs, pub.sent,
               (unsigned long long)unsent_msgs, (unsigned long long)expected,
               (unsigned long long)delivered, expected ? (double)delivered / expected : 0.0,
               rss_start, rss_max, rss_end);
        for (int i = 0; i < ns; i++) printf("%s%ld", i ? "," : "", samples[i]);
        printf("],\"slow_clients\":[");
        int first = 1;
        for (int i = 0; i < nconns; i++) {
            conn_t *c = &conns[i];
            if (c->kind != K_SLOW) continue;
            int was_dropped = c->state == S_CLOSED;
            dropped += was_dropped;
            printf("%s{\"joined\":%s,\"dropped\":%s,\"close_code\":%d,\"eof\":%s,\"frames_read_at_end\":%llu}",
                   first ? "" : ",", c->join_ns ? "true" : "false", was_dropped ? "true" : "false",
                   c->close_code, c->eof ? "true" : "false", (unsigned long long)c->frames);
            first = 0;
        }
        printf("],\"slow_dropped\":%d,\"slow_dropped_detected_during_run\":%d", dropped, dropped_during);
        print_latency();
    } else if (mode_rooms) {
        settle(1.0, cfg.settle_max);
        long rss_connected = server_rss_kb(), rss_max = rss_connected;
        uint64_t t = now_ns();
        rooms_schedule(t, cfg.warmup + cfg.duration);
        if (cfg.warmup > 0) run_for(cfg.warmup);
        /* the measured window: messages sent from now on are the window's */
        rm.win_first_seq = rm.sent;
        uint64_t skipped0 = rm.skipped;
        double s0 = server_cpu_us(), l0 = self_cpu_us();
        uint64_t w0 = now_ns(), next_sample = w0 + 1000000000ull;
        g.window = 1;
        while (rm.active) {
            pump(10);
            if (now_ns() >= next_sample) {
                long r = server_rss_kb();
                if (r > rss_max) rss_max = r;
                next_sample += 1000000000ull;
            }
        }
        g.window = 0;
        uint64_t w1 = now_ns();
        double s1 = server_cpu_us(), l1 = self_cpu_us();
        long rss_end = server_rss_kb();
        if (rss_end > rss_max) rss_max = rss_end;
        /* drain: what is still on its way gets `drain` seconds to arrive */
        uint64_t drain_end = w1 + (uint64_t)(cfg.drain * 1e9);
        while (rm.win_delivered < rm.win_expected && now_ns() < drain_end) pump(10);
        double drained = (double)(now_ns() - w1) / 1e9;
        double win = (double)(w1 - w0) / 1e9;
        uint64_t lost = rm.win_expected > rm.win_delivered ? rm.win_expected - rm.win_delivered : 0;
        printf(",\"rooms\":%d,\"members\":%d,\"interval_s\":%.3f,\"open_members\":%d,"
               "\"window_s\":%.3f,\"msgs_sent\":%llu,\"msgs_skipped\":%llu,"
               "\"expected_deliveries\":%llu,\"deliveries\":%llu,\"lost\":%llu,\"drain_s\":%.3f,\"drain_limit_s\":%.3f,"
               "\"window_deliveries\":%llu,\"deliveries_per_s\":%.1f,\"expected_per_s\":%.1f,"
               "\"server_cpu_us\":%.0f,\"loadgen_cpu_us\":%.0f,"
               "\"server_cpu_us_per_delivery\":%.3f,\"loadgen_cpu_us_per_delivery\":%.3f,"
               "\"server_cpu_pct\":%.1f,\"loadgen_cpu_pct\":%.1f,"
               "\"rss_before_kb\":%ld,\"rss_connected_kb\":%ld,\"rss_max_kb\":%ld,\"rss_end_kb\":%ld,"
               "\"presence_frames\":%llu",
               cfg.rooms, cfg.members, cfg.interval, g.open_subs, win,
               (unsigned long long)rm.win_msgs, (unsigned long long)(rm.skipped - skipped0),
               (unsigned long long)rm.win_expected, (unsigned long long)rm.win_delivered,
               (unsigned long long)lost, drained, cfg.drain,
               (unsigned long long)g.win_deliveries, g.win_deliveries / win, rm.win_expected / win,
               s1 - s0, l1 - l0,
               g.win_deliveries ? (s1 - s0) / g.win_deliveries : 0,
               g.win_deliveries ? (l1 - l0) / g.win_deliveries : 0,
               (s1 - s0) / (win * 1e4), (l1 - l0) / (win * 1e4),
               rss_before, rss_connected, rss_max, rss_end, (unsigned long long)g.pres_frames);
        print_latency();
    } else if (mode_storm) {
        settle(1.0, cfg.settle_max);
        uint64_t t = now_ns();
        st.pub_start_ns = t;
        st.before_ns = t + (uint64_t)(cfg.warmup * 1e9);
        st.pub_stop_ns = UINT64_MAX;
        st.pub_active = 1;
        run_for(cfg.warmup + cfg.duration);
        /* stdout is a pipe, so fully buffered: the JSON line begun above is still in
           the buffer, and this line, written past it, reaches run.py first */
        uint64_t ready_at = now_ns();
        if (write(1, "ready\n", 6) != 6) die("write");
        /* run.py restarts the server now; everyone comes back, then `tail` more seconds */
        for (;;) {
            uint64_t now = now_ns();
            if (!st.term_ns && now - ready_at > 60000000000ull) break;   /* no restart came */
            if (st.term_ns && now - st.term_ns > (uint64_t)(cfg.storm_timeout * 1e9)) break;
            if (st.all_back_ns && now - st.all_back_ns >= (uint64_t)(cfg.tail * 1e9)) break;
            pump(10);
        }
        st.pub_active = 0;
        uint64_t pub_end = now_ns();
        /* drain: acknowledged messages still on their way to subscribers, echoes still due */
        uint64_t drain_end = pub_end + (uint64_t)(cfg.drain * 1e9);
        for (int settled = 0; !settled && now_ns() < drain_end;) {
            run_for(0.1);
            settled = 1;
            for (uint32_t k = 0; k < st.next_slot && settled; k++)
                if (st.sent_ns[k] && (st.acked[k] ? st.got[k] < (uint32_t)cfg.members : st.sent_ns[k] > st.ready_ns))
                    settled = 0;
        }
        double drained = (double)(now_ns() - pub_end) / 1e9;
        st.finishing = 1;
        epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
        /* every message: acknowledged (live echo, or replayed to the publisher), who got it */
        uint64_t sent = 0, live = 0, replayed = 0, unacked = 0, expected = 0, delivered = 0;
        uint64_t lost_d = 0, lost_m = 0, lost_m_before = 0, got_unacked = 0;
        for (uint32_t k = 0; k < st.next_slot; k++) {
            if (!st.sent_ns[k]) continue;
            sent++;
            if (!st.acked[k]) { unacked++; got_unacked += st.got[k] > 0; continue; }
            if (st.acked[k] == 1) live++; else replayed++;
            expected += (uint64_t)cfg.members;
            delivered += st.got[k];
            if (st.got[k] < (uint32_t)cfg.members) {
                lost_m++;
                lost_d += (uint64_t)cfg.members - st.got[k];
                lost_m_before += st.sent_ns[k] < st.term_ns;
            }
        }
        double s_ns = 1e9;
        printf(",\"rooms\":%d,\"members\":%d,\"subs\":%d,\"pubs\":%d,\"rate\":%.1f,"
               "\"restarted\":%s,\"term_to_first_close_s\":%.3f,\"term_to_ready_s\":%.3f,"
               "\"term_to_first_welcome_s\":%.3f,\"term_to_all_back_s\":%.3f,\"subs_back\":%d,"
               "\"subs_recovered\":%llu,\"subs_not_recovered\":%llu,\"pub_recovered\":%llu,"
               "\"pub_not_recovered\":%llu,\"resumes_without_recovered\":%llu,\"epoch_changes\":%llu,"
               "\"replayed_frames\":%llu,\"reconnect_attempts\":%llu,\"failed_attempts\":%llu,"
               "\"closes_1012\":%llu,\"closes_1001\":%llu,\"closes_other\":%llu,\"closes_eof\":%llu,"
               "\"msgs_sent\":%llu,\"msgs_skipped\":%llu,\"msgs_acked_live\":%llu,\"msgs_acked_by_replay\":%llu,"
               "\"msgs_unacked\":%llu,\"msgs_unacked_but_received\":%llu,"
               "\"expected_deliveries\":%llu,\"deliveries\":%llu,\"lost_deliveries\":%llu,\"lost_msgs\":%llu,"
               "\"lost_msgs_sent_before_term\":%llu,\"duplicates\":%llu,\"foreign_frames\":%llu,"
               "\"drain_s\":%.3f,\"drain_limit_s\":%.3f,\"storm_window_s\":%.3f,"
               "\"server_cpu_startup_us\":%.0f,\"server_cpu_ready_to_back_us\":%.0f,\"ready_to_back_s\":%.3f,"
               "\"loadgen_cpu_term_to_back_us\":%.0f,\"presence_frames\":%llu",
               cfg.rooms, cfg.members, st.nsubs, st.npubs, cfg.rate, st.term_ns ? "true" : "false",
               st.first_close_ns > st.term_ns && st.term_ns ? (st.first_close_ns - st.term_ns) / s_ns : -1.0,
               st.ready_ns > st.term_ns && st.term_ns ? (st.ready_ns - st.term_ns) / s_ns : -1.0,
               st.first_welcome_ns ? (st.first_welcome_ns - st.term_ns) / s_ns : -1.0,
               st.all_back_ns ? (st.all_back_ns - st.term_ns) / s_ns : -1.0, st.back,
               (unsigned long long)st.sub_recovered, (unsigned long long)st.sub_gap,
               (unsigned long long)st.pub_recovered, (unsigned long long)st.pub_gap,
               (unsigned long long)st.no_answer, (unsigned long long)st.epoch_changes,
               (unsigned long long)st.replayed, (unsigned long long)st.attempts,
               (unsigned long long)st.failed_attempts, (unsigned long long)st.closes_1012,
               (unsigned long long)st.closes_1001, (unsigned long long)st.closes_other,
               (unsigned long long)st.closes_eof, (unsigned long long)sent, (unsigned long long)st.skipped,
               (unsigned long long)live, (unsigned long long)replayed, (unsigned long long)unacked,
               (unsigned long long)got_unacked, (unsigned long long)expected, (unsigned long long)delivered,
               (unsigned long long)lost_d, (unsigned long long)lost_m, (unsigned long long)lost_m_before,
               (unsigned long long)st.dups, (unsigned long long)st.wrong_room, drained, cfg.drain,
               st.term_ns ? (pub_end - st.term_ns) / s_ns : 0.0,
               st.cpu_ready_us, st.all_back_ns && st.cpu_ready_us >= 0 ? st.cpu_back_us - st.cpu_ready_us : -1.0,
               st.all_back_ns && st.ready_ns ? ((double)st.all_back_ns - (double)st.ready_ns) / s_ns : -1.0,
               st.all_back_ns ? st.lg_cpu_back_us - st.lg_cpu_term_us : -1.0,
               (unsigned long long)g.pres_frames);
        print_lat("rtt_before", &st.rtt_before);
        print_lat("rtt_storm", &st.rtt_storm);
        /* the first few lost deliveries, to look into: which message, which subscriber, its state */
        printf(",\"lost_examples\":[");
        int shown = 0;
        for (uint32_t k = 0; k < st.next_slot && shown < 10; k++) {
            if (!st.sent_ns[k] || !st.acked[k] || st.got[k] >= (uint32_t)cfg.members) continue;
            int room = (int)(k % (uint32_t)st.npubs);
            uint64_t bit = k / (uint64_t)st.npubs;
            for (int j = 0; j < cfg.members && shown < 10; j++) {
                int i = st.npubs + room * cfg.members + j;
                if (st.seen[(size_t)(i - st.npubs) * (size_t)st.seen_words + bit / 64] & (1ull << (bit % 64))) continue;
                sconn_t *sc = &st.sc[i];
                printf("%s{\"slot\":%u,\"id\":%u,\"room\":%d,\"member\":%d,\"sent_ms_after_term\":%.1f,"
                       "\"acked\":%d,\"sub_up\":%d,\"sub_since\":%llu,\"sub_welcome_last_id\":%llu,"
                       "\"sub_last_id\":%llu,\"sub_epoch\":\"%s\",\"sub_welcomed_ms_after_term\":%.1f}",
                       shown ? "," : "", k, st.msg_id[k], room, j,
                       ((double)st.sent_ns[k] - (double)st.term_ns) / 1e6, st.acked[k], sc->up,
                       (unsigned long long)sc->since, (unsigned long long)sc->welcome_last_id,
                       (unsigned long long)sc->last_id, sc->epoch,
                       ((double)conns[i].join_ns - (double)st.term_ns) / 1e6);
                shown++;
            }
        }
        printf("]");
    } else if (mode_conns) {
        settle(1.0, cfg.settle_max);
        long rss_after = server_rss_kb();
        printf(",\"rss_before_kb\":%ld,\"rss_after_kb\":%ld,\"rss_per_conn_bytes\":%.0f,"
               "\"presence_frames\":%llu,\"presence_bytes\":%llu",
               rss_before, rss_after,
               g.connected ? (double)(rss_after - rss_before) * 1024.0 / g.connected : 0.0,
               (unsigned long long)g.pres_frames, (unsigned long long)g.pres_bytes);
    } else if (mode_join) {
        /* count until `tail` seconds after the last join completed */
        uint64_t end = g.last_join_ns + (uint64_t)(cfg.tail * 1e9);
        while (now_ns() < end) pump(10);
        uint64_t maxf = 0, maxb = 0;
        for (int i = 0; i < nconns; i++) {
            if (conns[i].pres_frames > maxf) maxf = conns[i].pres_frames;
            if (conns[i].pres_bytes > maxb) maxb = conns[i].pres_bytes;
        }
        printf(",\"members\":%d,\"presence_frames\":%llu,\"presence_bytes\":%llu,"
               "\"presence_frames_per_member\":%.2f,\"presence_bytes_per_member\":%.1f,"
               "\"presence_frames_max_member\":%llu,\"presence_bytes_max_member\":%llu",
               g.connected, (unsigned long long)g.pres_frames, (unsigned long long)g.pres_bytes,
               g.connected ? (double)g.pres_frames / g.connected : 0.0,
               g.connected ? (double)g.pres_bytes / g.connected : 0.0,
               (unsigned long long)maxf, (unsigned long long)maxb);
    }
    printf(",");
    print_common();
    printf("}\n");
    fflush(stdout);

    if (cfg.hold) {
        /* keep the sockets open until run.py has stopped the server */
        char b[64];
        while (read(0, b, sizeof b) > 0) {}
    }
    return 0;
}

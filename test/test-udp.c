/* UDP channels (poll backend) with ac_recvfrom/ac_sendto, both modes and
 * families; an ICMP error as POLLERR (L-15, E-02, E-03); D-11 on a
 * datagram socket. */
#include "task.h"

#include <arpa/inet.h>
#include <stddef.h>
#include <sys/un.h>
#include <unistd.h>

static const int modes[2] = {0, 1};

typedef struct {
  ac_dispatcher_t d;
  char got[64];
  ssize_t ngot;
  int reads;
  int closes;
  int errors;
  int last_error;
  int connects;
  int sent;
  struct sockaddr_storage from;
  struct sockaddr_storage to;   /* where handle_write sends */
  const char *msg;
  size_t msglen;
  int echo;                     /* server: send back what came */
} udp_t;

static udp_t *udp(ac_dispatcher_t *d) { return ac_container_of(d, udp_t, d); }

static int u_writable(ac_dispatcher_t *d) {
  return udp(d)->msg != NULL && !udp(d)->sent;
}

static int u_write(ac_dispatcher_t *d) {
  udp_t *u = udp(d);
  ssize_t n = ac_sendto(d, u->msg, u->msglen,
                        u->to.ss_family ? (struct sockaddr *) &u->to : NULL);

  if (n < 0) {
    return (int) n;
  }
  u->sent = 1;
  return 0;
}

static int u_read(ac_dispatcher_t *d) {
  udp_t *u = udp(d);
  socklen_t len = sizeof(u->from);
  ssize_t n = ac_recvfrom(d, u->got, sizeof(u->got), &u->from, &len);

  u->reads++;
  if (n < 0) {
    return (int) n;
  }
  u->ngot = n;
  if (u->echo) {
    n = ac_sendto(d, u->got, (size_t) n, (struct sockaddr *) &u->from);
  }
  return n < 0 ? (int) n : 0;
}

static int u_close(ac_dispatcher_t *d) {
  udp(d)->closes++;
  return ac_close(d);
}

static int u_error(ac_dispatcher_t *d, const ac_error_t *e) {
  udp(d)->errors++;
  udp(d)->last_error = e->code;
  return ac_close(d);
}

static int u_connect(ac_dispatcher_t *d) {
  udp(d)->connects++;
  return 0;
}

static const ac_dispatcher_ops_t udp_ops = {
    .writable = u_writable,
    .handle_write = u_write,
    .handle_read = u_read,
    .handle_close = u_close,
    .handle_error = u_error,
    .handle_connect = u_connect,
};

/* A bound UDP channel on the loopback address of `family`. */
static int udp_open(udp_t *u, ac_map_t *map, int family) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r;

  memset(u, 0, sizeof(*u));
  task_addr(family, 0, &ss);
  r = ac_dispatcher_init(&u->d, map, &udp_ops);
  if (r == 0) {
    r = ac_create_socket(&u->d, family, SOCK_DGRAM);
  }
  if (r == 0) {
    r = ac_bind(&u->d, (struct sockaddr *) &ss);
  }
  if (r == 0) {
    getsockname(ac_fileno(&u->d), (struct sockaddr *) &u->to, &len);
  }
  return r;
}

#define LOOP_UNTIL(map, mode, cond, max)                                      \
  do {                                                                        \
    int n_;                                                                   \
    for (n_ = 0; n_ < (max) && !(cond); n_++) {                               \
      ASSERT_OK(ac_loop((map), 0.01, (mode), 1));                             \
    }                                                                         \
    ASSERT(cond);                                                             \
  } while (0)

/* A datagram round trip: the client sends with ac_sendto from
 * handle_write, the server answers to the address ac_recvfrom gave, both
 * IPv4 and IPv6, select and poll mode. */
TASK(udp_echo_round_trip) {
  static const int families[2] = {AF_INET, AF_INET6};
  int f;
  int m;

  for (f = 0; f < 2; f++) {
    for (m = 0; m < 2; m++) {
      ac_map_t *map = task_map_new();
      udp_t srv;
      udp_t cli;

      ASSERT(map != NULL);
      ASSERT_OK(udp_open(&srv, map, families[f]));
      ASSERT_OK(udp_open(&cli, map, families[f]));
      ASSERT_EQ(srv.d.backend, AC_BACKEND_POLL);
      ASSERT_EQ(srv.d.type, SOCK_DGRAM);
      srv.echo = 1;
      memcpy(&cli.to, &srv.to, sizeof(cli.to));
      cli.msg = "ping";
      cli.msglen = 4;
      LOOP_UNTIL(map, modes[m], cli.ngot == 4, 500);
      ASSERT_MEM_EQ(cli.got, "ping", 4);
      ASSERT_EQ(srv.ngot, 4);
      ASSERT_EQ(cli.from.ss_family, families[f]);
      ASSERT_MEM_EQ(&cli.from, &srv.to,
                    f == 0 ? sizeof(struct sockaddr_in)
                           : sizeof(struct sockaddr_in6));
      ASSERT_EQ(srv.closes + cli.closes + srv.errors + cli.errors, 0);
      task_map_free(map);
    }
  }
}

/* An empty datagram is a datagram, not EOF: ac_recvfrom returns 0 and no
 * handle_close follows (unlike ac_recv on a stream, D-14). */
TASK(udp_empty_datagram_is_not_eof) {
  int m;

  for (m = 0; m < 2; m++) {
    ac_map_t *map = task_map_new();
    udp_t srv;
    udp_t cli;

    ASSERT(map != NULL);
    ASSERT_OK(udp_open(&srv, map, AF_INET));
    ASSERT_OK(udp_open(&cli, map, AF_INET));
    srv.ngot = -1;
    memcpy(&cli.to, &srv.to, sizeof(cli.to));
    cli.msg = "";
    cli.msglen = 0;
    LOOP_UNTIL(map, modes[m], srv.ngot == 0, 500);
    ASSERT_EQ(srv.reads, 1);
    ASSERT_EQ(srv.closes, 0);
    ASSERT(!ac_is_closed(&srv.d));
    ASSERT_EQ(ac_map_len(map), 2);
    task_map_free(map);
  }
}

/* Nothing queued: UV_EAGAIN, as socket.recvfrom raises BlockingIOError. */
TASK(udp_recvfrom_would_block) {
  ac_map_t *map = task_map_new();
  udp_t u;
  char buf[4];

  ASSERT(map != NULL);
  ASSERT_OK(udp_open(&u, map, AF_INET));
  ASSERT_EQ(ac_recvfrom(&u.d, buf, sizeof(buf), NULL, NULL), UV_EAGAIN);
  task_map_free(map);
}

/* Bad input returns codes, never crashes. */
TASK(udp_bad_input) {
  ac_map_t *map = task_map_new();
  udp_t u;
  ac_dispatcher_t tcp;
  struct sockaddr_storage ss;
  char buf[4];

  ASSERT(map != NULL);
  ASSERT_EQ(ac_recvfrom(NULL, buf, 1, NULL, NULL), UV_EINVAL);
  ASSERT_EQ(ac_sendto(NULL, buf, 1, NULL), UV_EINVAL);
  ASSERT_OK(udp_open(&u, map, AF_INET));
  ASSERT_EQ(ac_recvfrom(&u.d, NULL, 1, NULL, NULL), UV_EINVAL);
  ASSERT_EQ(ac_sendto(&u.d, NULL, 1, NULL), UV_EINVAL);
  memset(&ss, 0, sizeof(ss));
  ss.ss_family = AF_APPLETALK;
  ASSERT_EQ(ac_sendto(&u.d, "x", 1, (struct sockaddr *) &ss),
            UV_EAFNOSUPPORT);
  ASSERT_EQ(ac_sendto(&u.d, "x", 1, NULL), UV_EDESTADDRREQ);
  ac_close(&u.d);
  ASSERT_EQ(ac_recvfrom(&u.d, buf, 1, NULL, NULL), UV_EBADF);
  ASSERT_EQ(ac_sendto(&u.d, "x", 1, NULL), UV_EBADF);
  ASSERT_OK(ac_dispatcher_init(&tcp, map, NULL));
  ASSERT_OK(ac_create_socket(&tcp, AF_INET, SOCK_STREAM));
  ASSERT_EQ(ac_recvfrom(&tcp, buf, 1, NULL, NULL), UV_EPROTOTYPE);
  ASSERT_EQ(ac_sendto(&tcp, "x", 1, NULL), UV_EPROTOTYPE);
  task_map_free(map);
}

/* D-11 on a datagram socket: connect completes at once, handle_connect
 * runs inside ac_connect, and ac_sendto(NULL) / ac_send go to the peer. */
TASK(udp_connected) {
  ac_map_t *map = task_map_new();
  udp_t srv;
  udp_t cli;

  ASSERT(map != NULL);
  ASSERT_OK(udp_open(&srv, map, AF_INET));
  ASSERT_OK(udp_open(&cli, map, AF_INET));
  ASSERT_OK(ac_connect(&cli.d, (struct sockaddr *) &srv.to));
  ASSERT_EQ(cli.connects, 1);
  ASSERT_EQ(cli.d.connected, 1);
  ASSERT_EQ(ac_sendto(&cli.d, "ab", 2, NULL), 2);
  LOOP_UNTIL(map, 0, srv.ngot == 2, 500);
  ASSERT_MEM_EQ(srv.got, "ab", 2);
  srv.ngot = 0;
  ASSERT_EQ(ac_send(&cli.d, "cde", 3), 3);
  LOOP_UNTIL(map, 1, srv.ngot == 3, 500);
  ASSERT_MEM_EQ(srv.got, "cde", 3);
  task_map_free(map);
}

/* L-15: a connected UDP socket whose datagram met a closed port gets
 * ICMP "port unreachable": POLLERR.  Select mode counts ERR as readable
 * (handle_read, whose recvfrom raises ECONNREFUSED: handle_error, E-02);
 * poll mode reports POLLERR alone, so readwrite calls handle_close
 * (E-03), as Python does. */
TASK(udp_icmp_error_is_pollerr) {
  int m;

  for (m = 0; m < 2; m++) {
    ac_map_t *map = task_map_new();
    udp_t gone;
    udp_t cli;
    struct sockaddr_storage dead;

    ASSERT(map != NULL);
    ASSERT_OK(udp_open(&gone, map, AF_INET));
    memcpy(&dead, &gone.to, sizeof(dead));
    ac_close(&gone.d); /* nobody listens there any more */
    ASSERT_OK(udp_open(&cli, map, AF_INET));
    ASSERT_OK(ac_connect(&cli.d, (struct sockaddr *) &dead));
    ASSERT_EQ(ac_sendto(&cli.d, "x", 1, NULL), 1);
    LOOP_UNTIL(map, modes[m], ac_is_closed(&cli.d), 500);
    if (m == 0) {
      ASSERT_EQ(cli.reads, 1);
      ASSERT_EQ(cli.errors, 1);
      ASSERT_EQ(cli.last_error, UV_ECONNREFUSED);
      ASSERT_EQ(cli.closes, 0);
    } else {
      ASSERT_EQ(cli.reads, 0);
      ASSERT_EQ(cli.errors, 0);
      ASSERT_EQ(cli.closes, 1);
    }
    task_map_free(map);
  }
}

/* An AF_UNIX datagram address: an abstract name (leading NUL) when
 * `abstract`, else a path; of family AF_UNIX, the rest zero. */
static void unix_addr(struct sockaddr_storage *ss, const char *name,
                      int abstract) {
  struct sockaddr_un *un = (struct sockaddr_un *) ss;

  memset(ss, 0, sizeof(*ss));
  un->sun_family = AF_UNIX;
  /* the process id in the name: two runs of the suite at once (two
   * builds) would otherwise bind the same abstract names (EADDRINUSE) */
  (void) snprintf(un->sun_path + (abstract ? 1 : 0),
                  sizeof(un->sun_path) - 1, "%s-%ld", name, (long) getpid());
}

/* A datagram channel bound to `name` (AF_UNIX, abstract), echoing or
 * sending as udp_open's. */
static int unix_dgram_open(udp_t *u, ac_map_t *map, const char *name) {
  int r;

  memset(u, 0, sizeof(*u));
  unix_addr(&u->to, name, 1);
  r = ac_dispatcher_init(&u->d, map, &udp_ops);
  if (r == 0) {
    r = ac_create_socket(&u->d, AF_UNIX, SOCK_DGRAM);
  }
  if (r == 0) {
    r = ac_bind(&u->d, (struct sockaddr *) &u->to);
  }
  return r;
}

/* AF_UNIX datagrams between abstract names: ac_sendto gives the kernel an
 * abstract address's exact length, as ac_bind and ac_connect do (the name
 * is the bytes up to the address's length: with the whole sun_path the
 * datagram went to another name, UV_ECONNREFUSED).  The server answers
 * each client at the address ac_recvfrom gave, a longer name first, then
 * a shorter one: ac_recvfrom zero-fills `addr` past the address, so that
 * no byte of the longer name is left in the shorter one.  Both modes. */
TASK(udp_unix_abstract_round_trip) {
  int m;

  for (m = 0; m < 2; m++) {
    ac_map_t *map = task_map_new();
    udp_t srv;
    udp_t lng;
    udp_t sht;

    ASSERT(map != NULL);
    ASSERT_OK(unix_dgram_open(&srv, map, "uvac-udp-srv"));
    ASSERT_OK(unix_dgram_open(&lng, map, "uvac-udp-longer-name"));
    ASSERT_OK(unix_dgram_open(&sht, map, "uvac-udp-s"));
    srv.echo = 1;
    memcpy(&lng.to, &srv.to, sizeof(lng.to));
    lng.msg = "long";
    lng.msglen = 4;
    LOOP_UNTIL(map, modes[m], lng.ngot == 4, 500);
    ASSERT_MEM_EQ(lng.got, "long", 4);
    memcpy(&sht.to, &srv.to, sizeof(sht.to));
    sht.msg = "short";
    sht.msglen = 5;
    LOOP_UNTIL(map, modes[m], sht.ngot == 5, 500);
    ASSERT_MEM_EQ(sht.got, "short", 5);
    ASSERT_EQ(lng.reads, 1); /* the short one's echo did not come here */
    ASSERT_EQ(srv.errors + lng.errors + sht.errors, 0);
    task_map_free(map);
  }
}

/* An unnamed sender (an AF_UNIX datagram socket without a name) has no
 * address: ac_recvfrom gives length 0 and family AF_UNSPEC, so that a
 * reply to it fails (UV_EAFNOSUPPORT) instead of going to the address a
 * previous datagram left in the caller's buffer. */
TASK(udp_recvfrom_unnamed_sender) {
  ac_map_t *map = task_map_new();
  udp_t srv;
  udp_t named;
  struct sockaddr_storage from;
  socklen_t len = sizeof(from);
  char buf[8];
  int s;

  ASSERT(map != NULL);
  ASSERT_OK(unix_dgram_open(&srv, map, "uvac-udp-srv2"));
  ASSERT_OK(unix_dgram_open(&named, map, "uvac-udp-named"));
  ASSERT_EQ(ac_sendto(&named.d, "a", 1, (struct sockaddr *) &srv.to), 1);
  ASSERT_EQ(ac_recvfrom(&srv.d, buf, sizeof(buf), &from, &len), 1);
  ASSERT_EQ(from.ss_family, AF_UNIX);
  ASSERT_GT(len, offsetof(struct sockaddr_un, sun_path));
  s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(s, 0);
  ASSERT_EQ(sendto(s, "b", 1, 0, (struct sockaddr *) &srv.to,
                   (socklen_t) (offsetof(struct sockaddr_un, sun_path) + 1 +
                                strlen(((struct sockaddr_un *) &srv.to)
                                           ->sun_path + 1))),
            1);
  len = sizeof(from);
  ASSERT_EQ(ac_recvfrom(&srv.d, buf, sizeof(buf), &from, &len), 1);
  ASSERT_EQ(len, 0);
  ASSERT_EQ(from.ss_family, AF_UNSPEC);
  ASSERT_EQ(ac_sendto(&srv.d, "x", 1, (struct sockaddr *) &from),
            UV_EAFNOSUPPORT);
  ASSERT_EQ(recv(ac_fileno(&named.d), buf, sizeof(buf), MSG_DONTWAIT), -1);
  close(s);
  task_map_free(map);
}

/* An AF_UNIX name that fills sun_path, as Python takes it (a path of
 * sizeof(sun_path) bytes has no NUL; an abstract name, its NUL and 107
 * bytes): `abstract` picks which, the path under /tmp. */
static void full_unix_addr(struct sockaddr_un *un, int abstract) {
  char head[64];
  size_t n;

  memset(un, 0, sizeof(*un));
  un->sun_family = AF_UNIX;
  n = (size_t) snprintf(head, sizeof(head), "%suvac-udp-full-%ld-",
                        abstract ? "" : "/tmp/", (long) getpid());
  memset(un->sun_path, 'x', sizeof(un->sun_path));
  memcpy(un->sun_path + (abstract ? 1 : 0), head, n);
  if (abstract) {
    un->sun_path[0] = '\0';
  }
}

/* Names as long as sun_path holds, a path (no NUL) and an abstract name:
 * ac_bind, ac_sendto to the abstract one and ac_sendto back to the path
 * as ac_recvfrom gave it (the whole sun_path, then the NUL Linux adds
 * past the struct) take the exact length, never more than the struct
 * (the kernel refuses a longer one, UV_EINVAL, and reading past the
 * caller's sockaddr_un is an overflow ASan sees). */
TASK(udp_unix_names_filling_sun_path) {
  ac_map_t *map = task_map_new();
  struct sockaddr_un srv_addr;
  /* valgrind reads a path as a string, up to its NUL: one follows the
   * struct, where the kernel never looks */
  struct {
    struct sockaddr_un un;
    char nul;
  } cli_name = {{0}, 0};
  struct sockaddr_un *cli_addr = &cli_name.un;
  struct sockaddr_storage from;
  socklen_t len = sizeof(from);
  ac_dispatcher_t srv;
  ac_dispatcher_t cli;
  char path[sizeof(cli_addr->sun_path) + 1];
  char buf[8];

  ASSERT(map != NULL);
  full_unix_addr(&srv_addr, 1);
  full_unix_addr(cli_addr, 0);
  memcpy(path, cli_addr->sun_path, sizeof(cli_addr->sun_path));
  path[sizeof(cli_addr->sun_path)] = '\0';
  (void) unlink(path); /* a name a killed run left */
  ASSERT_OK(ac_dispatcher_init(&srv, map, NULL));
  ASSERT_OK(ac_create_socket(&srv, AF_UNIX, SOCK_DGRAM));
  ASSERT_OK(ac_bind(&srv, (struct sockaddr *) &srv_addr));
  ASSERT_OK(ac_dispatcher_init(&cli, map, NULL));
  ASSERT_OK(ac_create_socket(&cli, AF_UNIX, SOCK_DGRAM));
  ASSERT_OK(ac_bind(&cli, (struct sockaddr *) cli_addr));
  ASSERT_EQ(ac_sendto(&cli, "ping", 4, (struct sockaddr *) &srv_addr), 4);
  ASSERT_EQ(ac_recvfrom(&srv, buf, sizeof(buf), &from, &len), 4);
  ASSERT_GE(len, sizeof(struct sockaddr_un)); /* Linux: + its own NUL */
  ASSERT_MEM_EQ(((struct sockaddr_un *) &from)->sun_path, cli_addr->sun_path,
                sizeof(cli_addr->sun_path));
  ASSERT_EQ(ac_sendto(&srv, "pong", 4, (struct sockaddr *) &from), 4);
  ASSERT_EQ(recv(ac_fileno(&cli), buf, sizeof(buf), MSG_DONTWAIT), 4);
  ASSERT_MEM_EQ(buf, "pong", 4);
  task_map_free(map);
  ASSERT_OK(unlink(path));
}

static const task_t tasks[] = {
    TASK_ENTRY(udp_echo_round_trip),
    TASK_ENTRY(udp_empty_datagram_is_not_eof),
    TASK_ENTRY(udp_recvfrom_would_block),
    TASK_ENTRY(udp_bad_input),
    TASK_ENTRY(udp_connected),
    TASK_ENTRY(udp_icmp_error_is_pollerr),
    TASK_ENTRY(udp_unix_abstract_round_trip),
    TASK_ENTRY(udp_recvfrom_unnamed_sender),
    TASK_ENTRY(udp_unix_names_filling_sun_path),
};

int main(int argc, char **argv) {
  return task_run("udp", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}

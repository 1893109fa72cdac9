/* A misbehaving client of the guest agent's API socket. The agent must
 * answer or drop it, and keep serving others. Prints "hostile-ok". */
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

static int dial(void) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strcpy(a.sun_path, "/run/snowflock/agent.sock");
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return -1; }
    struct timeval tv = { .tv_sec = 20 };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return s;
}

static int frame(int s, const char *body, uint32_t len_override) {
    uint32_t len = len_override ? len_override : (uint32_t)strlen(body);
    if (write(s, &len, 4) != 4) return -1;
    if (body && *body && write(s, body, strlen(body)) < 0) return -1;
    return 0;
}

static int reply(int s, char *buf, size_t cap) {
    uint32_t len;
    if (read(s, &len, 4) != 4) return -1;
    if (len >= cap) return -1;
    size_t got = 0;
    while (got < len) { ssize_t n = read(s, buf + got, len - got); if (n <= 0) return -1; got += n; }
    buf[len] = 0;
    return 0;
}

int main(void) {
    char buf[4096];
    /* 1. Oversized length: the agent must close, not allocate 2 GiB. */
    int s = dial(); if (s < 0) return 1;
    frame(s, "", 0x7fffffff);
    if (read(s, buf, sizeof buf) > 0 && !strstr(buf, "error")) { fprintf(stderr, "no error for huge frame\n"); }
    close(s);
    /* 2. Garbage JSON: an error answer, connection usable or closed. */
    s = dial(); if (s < 0) return 1;
    frame(s, "{not json at all", 0);
    if (reply(s, buf, sizeof buf) < 0 || !strstr(buf, "bad_request")) { fprintf(stderr, "garbage: %s\n", buf); return 1; }
    close(s);
    /* 3. Valid JSON, invalid values. */
    s = dial(); if (s < 0) return 1;
    frame(s, "{\"op\":\"request_ticket\",\"n\":0}", 0);
    if (reply(s, buf, sizeof buf) < 0 || !strstr(buf, "bad_request")) { fprintf(stderr, "n=0: %s\n", buf); return 1; }
    close(s);
    /* 4. A client that connects and says nothing must not block others. */
    int idle = dial(); if (idle < 0) return 1;
    s = dial(); if (s < 0) return 1;
    frame(s, "{\"op\":\"id\"}", 0);
    if (reply(s, buf, sizeof buf) < 0 || !strstr(buf, "identity")) { fprintf(stderr, "id: %s\n", buf); return 1; }
    close(s); close(idle);
    printf("hostile-ok\n");
    return 0;
}

/* ffi/socket.ts against glibc's <sys/socket.h> and <sys/un.h> (see abi.h). */
#define _GNU_SOURCE
#include <sys/socket.h>
#include <sys/un.h>
#include "abi.h"

int main(void)
{
	abi_begin("ffi/socket.ts", "sys/socket.h, sys/un.h");

	CONST(AF_UNIX);
	CONST(SOCK_DGRAM);
	CONST(SOCK_NONBLOCK);
	CONST(SOCK_CLOEXEC);
	CONST(MSG_DONTWAIT);
	CONST(MSG_NOSIGNAL);
	VALUE("SOCKADDR_UN_SIZE", sizeof(struct sockaddr_un));
	OFFSET("SUN_FAMILY", struct sockaddr_un, sun_family);
	OFFSET("SUN_PATH", struct sockaddr_un, sun_path);

	return abi_end();
}

/* ffi/fcntl.ts against the fcntl(2) constants of glibc's <fcntl.h>, which come from
 * asm-generic/fcntl.h and linux/fcntl.h (see abi.h). */
#define _GNU_SOURCE
#include <fcntl.h>
#include "abi.h"

int main(void)
{
	abi_begin("ffi/fcntl.ts", "fcntl.h");

	CONST(F_GETOWN);
	CONST(F_SETOWN);
	CONST(F_SETSIG);
	CONST(F_GETSIG);
	CONST(F_RDLCK);
	CONST(F_WRLCK);
	CONST(F_UNLCK);
	CONST(F_SETLEASE);
	CONST(F_GETLEASE);

	return abi_end();
}

"""The device family: raw device-mapper devices, what the kernel holds, and
keeping the two in step."""

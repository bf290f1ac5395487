autoattach:
  usbvm: none

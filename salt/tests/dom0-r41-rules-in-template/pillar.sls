autoattach:
  usbvm: sys-usb
  template: fedora-41-minimal
  template_package:
    RedHat: salt://autoattach/files/autoattach-0.1.0-1.x86_64.rpm
  rules_via: template
  rules: |
    SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", ATTRS{idVendor}=="1050", ATTACH="vault"
  allow:
    - {source: sys-usb, class: usb, target: vault, options: [nostart, "id=1050:0407:*"]}
